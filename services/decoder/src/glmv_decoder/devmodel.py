"""Development checkpoints: tiny (or published-size) random decoders in the published on-disk layout.

``write_dev_checkpoint(out_dir)`` writes ``config.yaml`` (same hyperpyyaml structure and tags as the
published ``glm-4-voice-decoder/config.yaml``: seeds, scalars, ``llm``, ``flow``, ``hift``), ``flow.pt`` and
``hift.pt`` (plain state-dict OrderedDicts of fp32 tensors, published key names). Weights are drawn from a
private ``torch.Generator`` seeded with ``seed``: the same seed gives byte-identical tensors, and the
process-wide RNG is never touched.

Sizes: ``"dev"`` keeps every block type of the published model with tiny widths and fewer repeats (fast on a
CPU: tens of milliseconds for 25 tokens); ``"realsize"`` uses the published hyperparameters (111 M flow +
20 M HiFT parameters, ~530 MB on disk) for benchmarks. The mel width (80) and the 256-samples-per-frame
vocoder geometry are the same in both.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from glmv_decoder.config import (
    CFMConfig,
    DecoderConfig,
    EncoderConfig,
    EstimatorConfig,
    FlowConfig,
    LengthRegulatorConfig,
    parse_config,
)
from glmv_decoder.flow import FlowModel
from glmv_decoder.hift import F0PredictorConfig, HiFTConfig, HiFTGenerator

__all__ = ["dev_config", "render_config_yaml", "write_dev_checkpoint"]

Size = Literal["dev", "realsize"]

#: Default flow vocabulary per size: the published codebook has 16384 entries.
DEFAULT_CODEBOOK = {"dev": 64, "realsize": 16384}


def dev_config(size: Size = "dev", codebook_size: int | None = None) -> DecoderConfig:
    """The hyperparameters written by :func:`write_dev_checkpoint`."""
    if size not in DEFAULT_CODEBOOK:
        raise ValueError(f"size must be 'dev' or 'realsize', got {size!r}")
    vocab = DEFAULT_CODEBOOK[size] if codebook_size is None else int(codebook_size)
    if vocab < 1:
        raise ValueError("codebook_size must be >= 1")
    if size == "realsize":
        base = DecoderConfig()
        return DecoderConfig(base.sample_rate, FlowConfig(vocab_size=vocab), base.hift)
    encoder = EncoderConfig(input_size=64, output_size=64, attention_heads=4, linear_units=128, num_blocks=2)
    estimator = EstimatorConfig(
        channels=(32, 32), attention_head_dim=16, n_blocks=1, num_mid_blocks=1, num_heads=2
    )
    flow = FlowConfig(
        input_size=64,
        vocab_size=vocab,
        encoder=encoder,
        length_regulator=LengthRegulatorConfig(sampling_ratios=(1, 1)),
        decoder=CFMConfig(estimator=estimator),
    )
    hift = HiFTConfig(base_channels=32, f0_predictor=F0PredictorConfig(cond_channels=32))
    return DecoderConfig(flow=flow, hift=hift)


def _y(value: object) -> str:
    """A YAML scalar/flow-sequence spelled like the published file."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_y(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def render_config_yaml(cfg: DecoderConfig, llm_dims: tuple[int, int, int, int] | None = None) -> str:
    """Render ``cfg`` as a hyperpyyaml ``config.yaml`` with the published structure and tags.

    ``llm_dims`` = (text encoder size, llm size, attention units, heads) of the unused ``llm`` section;
    published values by default, tiny ones for dev configs.
    """
    f, e, r, d, s, h = (cfg.flow, cfg.flow.encoder, cfg.flow.length_regulator, cfg.flow.decoder,
                        cfg.flow.decoder.estimator, cfg.hift)
    text_size, llm_size, llm_units, llm_heads = llm_dims or (512, 1024, 2048, 8)
    sigma = repr(d.sigma_min)
    lines = [
        "# Decoder config in the layout of glm-4-voice-decoder/config.yaml (hyperpyyaml tags).",
        "__set_seed1: !apply:random.seed [1986]",
        "__set_seed2: !apply:numpy.random.seed [1986]",
        "__set_seed3: !apply:torch.manual_seed [1986]",
        "__set_seed4: !apply:torch.cuda.manual_seed_all [1986]",
        "",
        "# fixed params",
        f"sample_rate: {cfg.sample_rate}",
        f"text_encoder_input_size: {text_size}",
        f"llm_input_size: {llm_size}",
        f"llm_output_size: {llm_size}",
        f"spk_embed_dim: {f.spk_embed_dim}",
        "",
        "# model params (the llm section is not used by the decoder)",
        "llm: !new:cosyvoice.llm.llm.TransformerLM",
        "    text_encoder_input_size: !ref <text_encoder_input_size>",
        "    llm_input_size: !ref <llm_input_size>",
        "    llm_output_size: !ref <llm_output_size>",
        "    text_token_size: 51866",
        "    speech_token_size: 4096",
        "    length_normalized_loss: True",
        "    lsm_weight: 0",
        "    spk_embed_dim: !ref <spk_embed_dim>",
        "    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder",
        "        input_size: !ref <text_encoder_input_size>",
        f"        output_size: {llm_size}",
        f"        attention_heads: {llm_heads}",
        f"        linear_units: {llm_units}",
        f"        num_blocks: {3 if llm_dims is None else 1}",
        "        dropout_rate: 0.1",
        "        positional_dropout_rate: 0.1",
        "        attention_dropout_rate: 0",
        "        normalize_before: True",
        "        input_layer: 'linear'",
        "        pos_enc_layer_type: 'rel_pos_espnet'",
        "        selfattention_layer_type: 'rel_selfattn'",
        "        use_cnn_module: False",
        "        macaron_style: False",
        "        use_dynamic_chunk: False",
        "        use_dynamic_left_chunk: False",
        "        static_chunk_size: 1",
        "    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder",
        "        input_size: !ref <llm_input_size>",
        "        output_size: !ref <llm_output_size>",
        f"        attention_heads: {llm_heads}",
        f"        linear_units: {llm_units}",
        f"        num_blocks: {7 if llm_dims is None else 1}",
        "        dropout_rate: 0.1",
        "        positional_dropout_rate: 0.1",
        "        attention_dropout_rate: 0",
        "        input_layer: 'linear_legacy'",
        "        pos_enc_layer_type: 'rel_pos_espnet'",
        "        selfattention_layer_type: 'rel_selfattn'",
        "        static_chunk_size: 1",
        "",
        "flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec",
        f"    input_size: {f.input_size}",
        f"    output_size: {f.output_size}",
        "    spk_embed_dim: !ref <spk_embed_dim>",
        f"    output_type: {_y(f.output_type)}",
        f"    vocab_size: {f.vocab_size}",
        f"    input_frame_rate: {_y(f.input_frame_rate)}",
        f"    only_mask_loss: {_y(f.only_mask_loss)}",
        "    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder",
        f"        output_size: {e.output_size}",
        f"        attention_heads: {e.attention_heads}",
        f"        linear_units: {e.linear_units}",
        f"        num_blocks: {e.num_blocks}",
        f"        dropout_rate: {_y(e.dropout_rate)}",
        f"        positional_dropout_rate: {_y(e.positional_dropout_rate)}",
        f"        attention_dropout_rate: {_y(e.attention_dropout_rate)}",
        f"        normalize_before: {_y(e.normalize_before)}",
        f"        input_layer: {_y(e.input_layer)}",
        f"        pos_enc_layer_type: {_y(e.pos_enc_layer_type)}",
        f"        selfattention_layer_type: {_y(e.selfattention_layer_type)}",
        f"        block_size: {e.block_size}",
        f"        input_size: {e.input_size}",
        f"        use_cnn_module: {_y(e.use_cnn_module)}",
        f"        macaron_style: {_y(e.macaron_style)}",
        "    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator",
        f"        channels: {r.channels}",
        f"        sampling_ratios: {_y(r.sampling_ratios)}",
        "    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM",
        f"        in_channels: {d.in_channels}",
        f"        n_spks: {d.n_spks}",
        f"        spk_emb_dim: {d.spk_emb_dim}",
        "        cfm_params: !new:omegaconf.DictConfig",
        "            content:",
        f"                sigma_min: {sigma}",
        f"                solver: {_y(d.solver)}",
        f"                t_scheduler: {_y(d.t_scheduler)}",
        f"                training_cfg_rate: {_y(d.training_cfg_rate)}",
        f"                inference_cfg_rate: {_y(d.inference_cfg_rate)}",
        f"                reg_loss_type: {_y(d.reg_loss_type)}",
        "        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder",
        f"            in_channels: {s.in_channels}",
        f"            out_channels: {s.out_channels}",
        f"            channels: {_y(s.channels)}",
        f"            dropout: {_y(s.dropout)}",
        f"            attention_head_dim: {s.attention_head_dim}",
        f"            n_blocks: {s.n_blocks}",
        f"            num_mid_blocks: {s.num_mid_blocks}",
        f"            num_heads: {s.num_heads}",
        f"            act_fn: {_y(s.act_fn)}",
        "",
        "hift: !new:cosyvoice.hifigan.generator.HiFTGenerator",
        f"    in_channels: {h.in_channels}",
        f"    base_channels: {h.base_channels}",
        f"    nb_harmonics: {h.nb_harmonics}",
        "    sampling_rate: !ref <sample_rate>",
        f"    nsf_alpha: {_y(h.nsf_alpha)}",
        f"    nsf_sigma: {_y(h.nsf_sigma)}",
        f"    nsf_voiced_threshold: {_y(h.nsf_voiced_threshold)}",
        f"    upsample_rates: {_y(h.upsample_rates)}",
        f"    upsample_kernel_sizes: {_y(h.upsample_kernel_sizes)}",
        "    istft_params:",
        f"        n_fft: {h.n_fft}",
        f"        hop_len: {h.hop_len}",
        f"    resblock_kernel_sizes: {_y(h.resblock_kernel_sizes)}",
        f"    resblock_dilation_sizes: {_y(h.resblock_dilation_sizes)}",
        f"    source_resblock_kernel_sizes: {_y(h.source_resblock_kernel_sizes)}",
        f"    source_resblock_dilation_sizes: {_y(h.source_resblock_dilation_sizes)}",
        f"    lrelu_slope: {_y(h.lrelu_slope)}",
        f"    audio_limit: {_y(h.audio_limit)}",
        "    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
        f"        num_class: {h.f0_predictor.num_class}",
        f"        in_channels: {h.f0_predictor.in_channels}",
        f"        cond_channels: {h.f0_predictor.cond_channels}",
        "",
    ]
    return "\n".join(lines)


_NORMS = (nn.LayerNorm, nn.GroupNorm)


def _random_state_dict(module: nn.Module, gen: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    """Seeded values for every entry of ``module.state_dict()`` (built on the meta device).

    Matrices/kernels ~ N(0, 1/fan_in) (embeddings N(0, 1)); norm scales 1 + 0.1 N; other vectors 0.05 N;
    Snake alphas 1 + 0.1 N; weight-norm magnitudes ``weight_g`` = ||weight_v|| * (1 + 0.05 N).
    """
    norm_params = {
        f"{name}.{p}" if name else p
        for name, m in module.named_modules()
        if isinstance(m, _NORMS)
        for p in ("weight",)
    }
    embeddings = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Embedding)}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, ref in module.state_dict().items():
        shape = tuple(ref.shape)
        z = torch.randn(shape, generator=gen, dtype=torch.float32)
        if key in embeddings:
            value = z
        elif key in norm_params or key.endswith(".alpha"):
            value = 1.0 + 0.1 * z
        elif len(shape) >= 2:
            value = z / math.sqrt(max(1, math.prod(shape[1:])))
        else:
            value = 0.05 * z
        out[key] = value.contiguous()
    for key in list(out):
        if key.endswith(".weight_g"):
            v = out[key[: -len("_g")] + "_v"]
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            out[key] = (norm * (1.0 + 0.05 * torch.randn(norm.shape, generator=gen))).contiguous()
    return out


def flow_state_dict(cfg: FlowConfig, seed: int) -> OrderedDict[str, torch.Tensor]:
    with torch.device("meta"):
        model = FlowModel(cfg)
    return _random_state_dict(model, torch.Generator().manual_seed(seed))


def hift_state_dict(cfg: HiFTConfig, seed: int) -> OrderedDict[str, torch.Tensor]:
    with torch.device("meta"):
        model = HiFTGenerator(cfg)
    sd = _random_state_dict(model, torch.Generator().manual_seed(seed + 1))
    # A voiced F0 (~120-250 Hz) so that the harmonic source path is exercised, not only the noise branch.
    sd["f0_predictor.classifier.bias"] = torch.full_like(sd["f0_predictor.classifier.bias"], 180.0)
    # Speech-like level (std ~0.05), unclipped: small log-magnitude/phase outputs from the last conv.
    sd["conv_post.weight_g"] = sd["conv_post.weight_g"] * 0.1
    return sd


def write_dev_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    codebook_size: int | None = None,
    size: Size = "dev",
) -> Path:
    """Write ``config.yaml``, ``flow.pt`` and ``hift.pt`` to ``out_dir`` (created); return the directory.

    ``codebook_size`` is the flow vocabulary (default 64 for ``dev``, 16384 for ``realsize``).
    """
    cfg = dev_config(size, codebook_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = render_config_yaml(cfg, None if size == "realsize" else (32, 32, 64, 2))
    if parse_config(text, "generated config.yaml") != cfg:  # the file must read back to the same values
        raise AssertionError("rendered decoder config does not round-trip")
    (out / "config.yaml").write_text(text, encoding="utf-8")
    torch.save(flow_state_dict(cfg.flow, seed), out / "flow.pt")
    torch.save(hift_state_dict(cfg.hift, seed), out / "hift.pt")
    return out
