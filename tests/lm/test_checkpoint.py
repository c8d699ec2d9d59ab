"""Checkpoint loading: ChatGLM layout conversion (vs an independent ChatGLM forward), native Glm dirs,
dtypes, limits, errors naming the path, streaming memory, deterministic dev checkpoints."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmv_common.errors import CheckpointError
from glmv_lm.checkpoint import load_model
from glmv_lm.devmodel import write_dev_checkpoint

PROMPT = [432, 434, 436, 10, 383, 5, 470, 471, 437, 100, 200, 300, 400, 500, 575, 0, 7]


def chatglm_state(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(model_dir / shard)))
    return state


def chatglm_forward(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """An independent fp32 forward of the ChatGLM architecture straight from the published keys
    (fused QKV with GQA, RoPE on the first half of each head as interleaved pairs, fused SwiGLU)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    sd = {k: v.double() for k, v in chatglm_state(model_dir).items()}
    heads, d, groups = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]
    eps, n = cfg["layernorm_epsilon"], len(ids)
    rot = d // 2
    theta = 1.0 / (10000.0 * cfg["rope_ratio"]) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), theta)  # [n, rot/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(t: torch.Tensor) -> torch.Tensor:
        pairs = t[..., :rot].reshape(n, t.shape[1], rot // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        turned = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
        return torch.cat([turned, t[..., rot:]], -1)

    h = sd["transformer.embedding.word_embeddings.weight"][ids]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        qkv = (
            x @ sd[p + "self_attention.query_key_value.weight"].T
            + sd[p + "self_attention.query_key_value.bias"]
        )
        q = qkv[:, : heads * d].reshape(n, heads, d)
        k = qkv[:, heads * d : heads * d + groups * d].reshape(n, groups, d)
        v = qkv[:, heads * d + groups * d :].reshape(n, groups, d)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * d)
        h = h + attn @ sd[p + "self_attention.dense.weight"].T
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate, up = (x @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    h = rms(h, sd["transformer.encoder.final_layernorm.weight"])
    return (h @ sd["transformer.output_layer.weight"].T).float()


@torch.inference_mode()
def logits(model_dir: Path, ids: list[int], **kw: object) -> torch.Tensor:
    loaded = load_model(model_dir, **kw)
    return loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def test_chatglm_layout_matches_independent_forward(dev_dir: Path) -> None:
    ours = logits(dev_dir, PROMPT)
    expected = chatglm_forward(dev_dir, PROMPT)
    assert ours.shape == expected.shape == (len(PROMPT), 576)
    assert (ours - expected).abs().max().item() < 1e-4


def test_rope_ratio_changes_the_base(tmp_path: Path, dev_dir: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(dev_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_ratio"] = 500
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_model(d).model.config.rope_parameters["rope_theta"] == 5_000_000
    assert (logits(d, PROMPT) - chatglm_forward(d, PROMPT)).abs().max().item() < 1e-4


def test_native_glm_directory_gives_identical_logits(tmp_path: Path, dev_dir: Path) -> None:
    loaded = load_model(dev_dir)
    native = tmp_path / "native"
    loaded.model.save_pretrained(native)
    assert json.loads((native / "config.json").read_text())["model_type"] == "glm"
    again = load_model(native)
    assert again.layout == "glm" and loaded.layout == "chatglm"
    assert torch.equal(logits(dev_dir, PROMPT), logits(native, PROMPT))
    assert again.max_context == loaded.max_context == 4096


def test_loaded_model_info(dev_dir: Path) -> None:
    m = load_model(dev_dir)
    gen = json.loads((dev_dir / "generation_config.json").read_text())
    assert m.eos_token_ids == gen["eos_token_id"]
    assert m.vocab_size == 576 and m.seq_length == 4096 and m.max_context == 4096
    assert m.pad_token_id == gen["pad_token_id"]
    assert not m.model.training
    assert all(not p.is_meta and p.dtype == torch.float32 for p in m.model.parameters())
    assert m.fingerprint == load_model(dev_dir).fingerprint
    assert load_model(dev_dir, max_context=100).max_context == 100


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(dev_dir: Path, dtype: str) -> None:
    m = load_model(dev_dir, dtype=dtype)
    assert {p.dtype for p in m.model.parameters()} == {getattr(torch, dtype)}
    with torch.inference_mode():
        out = m.model(input_ids=torch.tensor([PROMPT])).logits[0].float()
    ref = logits(dev_dir, PROMPT)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 0.5


def test_fingerprint_changes_with_config(tmp_path: Path, dev_dir: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(dev_dir, d)
    before = load_model(d).fingerprint
    cfg = json.loads((d / "config.json").read_text())
    cfg["layernorm_epsilon"] = 1e-5
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_model(d).fingerprint != before


def test_missing_and_broken_files_name_the_path(tmp_path: Path, dev_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "absent"))):
        load_model(tmp_path / "absent")
    d = tmp_path / "m"
    shutil.copytree(dev_dir, d)
    (d / "config.json").rename(d / "config.bak")
    with pytest.raises(CheckpointError, match=re.escape(str(d / "config.json"))):
        load_model(d)
    (d / "config.bak").rename(d / "config.json")
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape("model-00002-of-00002.safetensors")):
        load_model(d)
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        load_model(d)
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors.index.json")):
        load_model(d)


def test_config_weight_mismatch_and_unsupported_variants(tmp_path: Path, dev_dir: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(dev_dir, d)
    good = json.loads((d / "config.json").read_text())
    for change, message in [
        ({"multi_query_group_num": 4}, "query_key_value"),
        ({"hidden_size": 32}, "shape"),
        ({"num_layers": 3}, "lacks"),
        ({"rmsnorm": False}, "not supported"),
    ]:
        (d / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match=message):
            load_model(d)


def test_dev_checkpoint_is_deterministic_and_in_the_published_layout(tmp_path: Path, dev_dir: Path) -> None:
    again = write_dev_checkpoint(tmp_path / "again", seed=0)
    names = sorted(p.name for p in dev_dir.iterdir())
    assert (
        names
        == sorted(p.name for p in again.iterdir())
        == [
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )
    for name in names:
        assert (dev_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = write_dev_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model-00001-of-00002.safetensors").read_bytes() != (
        dev_dir / "model-00001-of-00002.safetensors"
    ).read_bytes()
    cfg = json.loads((dev_dir / "config.json").read_text())
    assert cfg["model_type"] == "chatglm" and cfg["multi_query_attention"] and cfg["add_qkv_bias"]
    for key in (
        "num_layers",
        "ffn_hidden_size",
        "kv_channels",
        "multi_query_group_num",
        "padded_vocab_size",
        "seq_length",
        "rope_ratio",
        "layernorm_epsilon",
    ):
        assert key in cfg
    index = json.loads((dev_dir / "model.safetensors.index.json").read_text())
    keys = set(chatglm_state(dev_dir))
    assert set(index["weight_map"]) == keys
    assert all(k.startswith("transformer.") for k in keys)
    assert "transformer.output_layer.weight" in keys and "transformer.rotary_pos_emb.inv_freq" in keys
    assert "transformer.encoder.layers.1.self_attention.query_key_value.weight" in keys


@pytest.mark.slow
def test_streaming_load_stays_below_1_3x_model_size(tmp_path: Path) -> None:
    mid = write_dev_checkpoint(tmp_path / "mid", size="mid")
    script = (
        "import resource, sys\n"
        "import torch, transformers\n"
        "from glmv_lm.checkpoint import load_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = load_model(sys.argv[1])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "size = sum(p.numel() * p.element_size() for p in m.model.parameters())\n"
        "print((after - before) * 1024 / size)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(mid)], capture_output=True, text=True, check=True)
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 1.3, f"peak memory grew by {ratio:.2f}x the model size while loading"
