"""Load a tokenizer checkpoint directory in the published layout; write dev checkpoints.

A directory holds ``config.json`` (Whisper config + VQ fields), ``model.safetensors`` and
``preprocessor_config.json``. Two key layouts of the weights are accepted:

* bare encoder keys (``conv1.weight``, ``layers.0.fc1.weight``, ... plus the ``ema_count`` /
  ``ema_weight`` training buffers), as ``WhisperVQEncoder.save_pretrained`` writes them;
* the training layout with the prefix ``model.encoder.`` (plus ``model.decoder.*``,
  ``proj_out.weight``, the final ``layer_norm`` and layers past the quantizer), as the
  reference's ``load_quantize_encoder`` reads it.

Layers at or after ``quantize_position``, ``layer_norm.*`` and ``ema_*`` are dropped. Nothing is
ever fetched from the network.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmv_common.errors import CheckpointError, missing_checkpoint

from .config import (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    WEIGHTS_FILE,
    WhisperVQConfig,
    published_config,
    published_preprocessor_config,
)
from .features import SAMPLE_RATE, FeaturePipeline, stack
from .model import WhisperVQEncoder, sinusoids

TRAINING_PREFIX = "model.encoder."
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HOW = "Point model_dir at a directory in the published glm-4-voice-tokenizer layout"

Size = Literal["dev", "realsize"]
Layout = Literal["bare", "training"]


@dataclass
class LoadedCheckpoint:
    path: Path
    config: WhisperVQConfig
    model: WhisperVQEncoder
    preprocessor: dict[str, object]
    fingerprint: str
    model_id: str
    layout: Layout


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise missing_checkpoint(model_dir / WEIGHTS_FILE, "tokenizer weights (model.safetensors)", _HOW)
    return files


def fingerprint(model_dir: Path) -> str:
    """sha256 over config.json, preprocessor_config.json and the weight files (names and bytes)."""
    digest = hashlib.sha256()
    for path in [model_dir / CONFIG_FILE, model_dir / PREPROCESSOR_FILE, *weight_files(model_dir)]:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _select(key: str, cfg: WhisperVQConfig, training: bool) -> str | None:
    """Map a stored key to the module's key, or None to drop it."""
    if training:
        if not key.startswith(TRAINING_PREFIX):
            return None  # decoder, proj_out: not part of the encoder
        key = key[len(TRAINING_PREFIX) :]
    if key.startswith(("layer_norm.", "ema_")):
        return None
    match = _LAYER_KEY.match(key)
    if match and int(match.group(1)) >= cfg.quantize_position:
        return None
    return key


def read_state_dict(model_dir: Path, cfg: WhisperVQConfig) -> tuple[dict[str, torch.Tensor], Layout]:
    files = weight_files(model_dir)
    keys: dict[str, tuple[Path, str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not iterable
                    keys[key] = (path, key)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    training = any(k.startswith(TRAINING_PREFIX) for k in keys)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for stored, (path, _) in keys.items():
        target = _select(stored, cfg, training)
        if target is not None:
            by_file.setdefault(path, []).append((stored, target))
    for path, pairs in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for stored, target in pairs:
                state[target] = fh.get_tensor(stored)
    return state, ("training" if training else "bare")


def _check_state(model: WhisperVQEncoder, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(
                f"{key}: shape {tuple(state[key].shape)} != config's {tuple(expected[key].shape)}"
            )
    if problems:
        raise CheckpointError(
            f"{where}: weights do not match {CONFIG_FILE} "
            "(expected the published Whisper-VQ encoder layout): " + "; ".join(problems[:10])
        )


def load_preprocessor(model_dir: Path, cfg: WhisperVQConfig) -> dict[str, object]:
    path = model_dir / PREPROCESSOR_FILE
    if not path.is_file():
        raise missing_checkpoint(path, "feature extractor config (preprocessor_config.json)", _HOW)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {PREPROCESSOR_FILE}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {PREPROCESSOR_FILE} must hold a JSON object")
    if int(data.get("feature_size", -1)) != cfg.num_mel_bins:
        raise CheckpointError(
            f"{path}: feature_size {data.get('feature_size')} != "
            f"num_mel_bins {cfg.num_mel_bins} of {CONFIG_FILE}"
        )
    if int(data.get("sampling_rate", 16000)) != 16000:
        raise CheckpointError(f"{path}: sampling_rate must be 16000 for the GLM-4-Voice tokenizer")
    return data


def resolve_dtype(device: str, dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if dtype != "float32" and not device.startswith("cuda"):
        raise ValueError(f"dtype {dtype} needs a CUDA device (got device={device!r}); use float32 on CPU")
    return _DTYPES[dtype]


def load_checkpoint(
    model_dir: str | Path | None, device: str = "cpu", dtype: str = "float32"
) -> LoadedCheckpoint:
    """Load and check a published tokenizer directory; the model comes back in eval mode."""
    if model_dir is None:
        raise missing_checkpoint("<unset>", "tokenizer model directory", f"{_HOW} (GLMV_TOKENIZER_MODEL_DIR)")
    path = Path(model_dir)
    if not path.is_dir():
        raise missing_checkpoint(path, "tokenizer model directory", _HOW)
    if not (path / CONFIG_FILE).is_file():
        raise missing_checkpoint(path / CONFIG_FILE, "tokenizer config (config.json)", _HOW)
    cfg = WhisperVQConfig.from_file(path / CONFIG_FILE)
    pre = load_preprocessor(path, cfg)
    torch_dtype = resolve_dtype(device, dtype)
    state, layout = read_state_dict(path, cfg)
    with torch.device("meta"):
        model = WhisperVQEncoder(cfg)
    _check_state(model, state, path / WEIGHTS_FILE)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    return LoadedCheckpoint(
        path=path,
        config=cfg,
        model=model,
        preprocessor=pre,
        fingerprint=fingerprint(path),
        model_id=path.resolve().name,
        layout=layout,
    )


# ---- dev checkpoints ----------------------------------------------------------------------------


def dev_config(size: Size = "dev", codebook_size: int | None = None) -> dict[str, object]:
    """Published config with dev (tiny) or published dimensions."""
    if size == "realsize":
        return published_config(quantize_vocab_size=codebook_size or 16384)
    if size != "dev":
        raise ValueError(f"size must be 'dev' or 'realsize', not {size!r}")
    return published_config(
        d_model=64,
        encoder_layers=4,
        encoder_attention_heads=4,
        encoder_ffn_dim=256,
        quantize_position=2,
        pooling_position=2,
        quantize_vocab_size=codebook_size or 64,
    )


def _random_tensor(
    key: str, shape: tuple[int, ...], cfg: WhisperVQConfig, gen: torch.Generator
) -> torch.Tensor:
    if key == "embed_positions.weight":
        return sinusoids(*shape)
    if key == "embed_positions2.weight":
        return sinusoids(cfg.max_source_positions, shape[1])[: shape[0]].clone()
    if key == "codebook.weight":
        return torch.randn(shape, generator=gen)
    if "layer_norm" in key and key.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if key.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen) * (4.0 if key.startswith("conv") else 1.0)


def synthetic_audio(seed: int, seconds: float = 12.0) -> np.ndarray:
    """Deterministic speech-like test signal at 16 kHz: chirps, noise bursts, pauses at varying levels."""
    rng = np.random.default_rng(seed)
    out = []
    total = int(seconds * SAMPLE_RATE)
    while sum(len(x) for x in out) < total:
        n = int(rng.uniform(0.1, 0.6) * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        kind = rng.integers(0, 3)
        if kind == 0:
            f0, f1 = rng.uniform(80, 4000, size=2)
            seg = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * t[-1] + 1e-9)))
        elif kind == 1:
            seg = rng.standard_normal(n)
        else:
            seg = 0.01 * rng.standard_normal(n)
        out.append(seg * 10 ** rng.uniform(-2.5, -0.3))
    return np.concatenate(out)[:total].astype(np.float32)


def _fit_codebook(cfg: WhisperVQConfig, state: dict[str, torch.Tensor], seed: int) -> None:
    """Replace the codebook by jittered encoder states of a synthetic signal (a k-means-like init).

    Random weights give states with a large common offset, so a codebook drawn around zero maps
    almost everything to a few codes; codes placed on real states give varied tokens (and near ties),
    which is what tests and parity checks need.
    """
    with torch.device("meta"):
        model = WhisperVQEncoder(cfg)
    model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("layer_norm.") and not _beyond_quantizer(k, cfg)},
        strict=True,
        assign=True,
    )
    model.eval()
    pipeline = FeaturePipeline(published_preprocessor_config(cfg.num_mel_bins), 2 * cfg.pool)
    windows = pipeline.utterance(synthetic_audio(seed))
    feats, mask = stack(windows)
    with torch.inference_mode():
        x, valid = model.encode(torch.from_numpy(feats), torch.from_numpy(mask))
    rows = x[valid].float()
    gen = torch.Generator().manual_seed(seed + 7)
    pick = torch.randint(0, rows.shape[0], (cfg.quantize_vocab_size,), generator=gen)
    jitter = rows.std(dim=0, keepdim=True) * torch.randn(cfg.quantize_vocab_size, cfg.d_model, generator=gen)
    state["codebook.weight"] = (rows[pick] + 0.5 * jitter).contiguous()


def _beyond_quantizer(key: str, cfg: WhisperVQConfig) -> bool:
    match = _LAYER_KEY.match(key)
    return bool(match and int(match.group(1)) >= cfg.quantize_position)


def random_state_dict(cfg: WhisperVQConfig, seed: int, extra_layers: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the bare published layout (``ema_*`` buffers included).

    Matrices ~ N(0, 0.02) like Whisper's init, LayerNorms near identity but not exactly, positions
    are Whisper sinusoids, ``embed_positions2`` starts as their first rows (as the reference does),
    and the codebook is drawn at the scale of the pooled hidden states so random inputs hit many codes.
    With ``extra_layers`` the layers past the quantizer and the final ``layer_norm`` are added too
    (the full training encoder).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WhisperVQEncoder(cfg).state_dict().items()}
    state = {key: _random_tensor(key, shape, cfg, gen) for key, shape in shapes.items()}
    if extra_layers:  # drawn from a second generator so the encoder part equals the bare layout's
        extra_gen = torch.Generator().manual_seed(seed + 1_000_003)
        with torch.device("meta"):
            full = WhisperVQEncoder(replace(cfg, quantize_position=cfg.encoder_layers)).state_dict()
        for key, tensor in full.items():
            if key not in state:
                state[key] = _random_tensor(key, tuple(tensor.shape), cfg, extra_gen)
        for name in ("layer_norm.weight", "layer_norm.bias"):
            state[name] = _random_tensor(name, (cfg.d_model,), cfg, extra_gen)
    _fit_codebook(cfg, state, seed)
    if cfg.quantize_ema_decay is not None:
        state["ema_count"] = torch.ones(cfg.quantize_vocab_size)
        state["ema_weight"] = state["codebook.weight"].clone()
    return state


def write_dev_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: Size = "dev",
    codebook_size: int | None = None,
    layout: Layout = "bare",
) -> Path:
    """Write a random-weight tokenizer in the published on-disk layout; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dev_config(size, codebook_size)
    if layout == "training":
        config = {
            **config,
            "quantize_encoder_only": False,
            "architectures": ["WhisperVQForConditionalGeneration"],
        }
    cfg = WhisperVQConfig.from_dict(config)
    state = random_state_dict(cfg, seed, extra_layers=layout == "training")
    if layout == "training":
        stored = {TRAINING_PREFIX + k: v for k, v in state.items()}
        gen = torch.Generator().manual_seed(seed + 1)
        stored["model.decoder.layer_norm.weight"] = torch.ones(cfg.d_model)
        stored["proj_out.weight"] = 0.02 * torch.randn(8, cfg.d_model, generator=gen)
    elif layout == "bare":
        stored = state
    else:
        raise ValueError(f"layout must be 'bare' or 'training', not {layout!r}")
    save_file(
        {k: v.contiguous() for k, v in stored.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    pre = published_preprocessor_config(cfg.num_mel_bins)
    (out / PREPROCESSOR_FILE).write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
