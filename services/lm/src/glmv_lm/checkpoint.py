"""Load the LM checkpoint (published ChatGLM layout or native Glm) into transformers' ``GlmForCausalLM``.

No remote code runs. The model is built on the ``meta`` device, then every tensor is read from the
safetensors shards one at a time (our own reader: a ``readinto`` straight into a fresh tensor, no
mmap of whole shards), converted (ChatGLM → Glm names, fused QKV split with the GQA sizes), cast to
the target dtype, moved to the target device and assigned in place of the meta parameter. Peak
memory is therefore the model plus one tensor, not two copies of the model.

ChatGLM → Glm weight mapping (``N`` = layer):

=====================================================  ==============================================
``transformer.embedding.word_embeddings.weight``       ``model.embed_tokens.weight``
``transformer.encoder.layers.N.input_layernorm``       ``model.layers.N.input_layernorm``
``transformer.encoder.layers.N.post_attention_...``    ``model.layers.N.post_attention_layernorm``
``...self_attention.query_key_value.{weight,bias}``    ``...self_attn.{q,k,v}_proj`` (rows q | k | v)
``...self_attention.dense.weight``                     ``...self_attn.o_proj.weight``
``...mlp.dense_h_to_4h.weight``                        ``...mlp.gate_up_proj.weight`` (same [gate; up])
``...mlp.dense_4h_to_h.weight``                        ``...mlp.down_proj.weight``
``transformer.encoder.final_layernorm.weight``         ``model.norm.weight``
``transformer.output_layer.weight``                    ``lm_head.weight``
``transformer.rotary_pos_emb.inv_freq``                dropped (recomputed)
=====================================================  ==============================================
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GlmConfig, GlmForCausalLM

from glmv_common.errors import CheckpointError, missing_checkpoint
from glmv_lm.config import (
    CHATGLM_LAYOUT,
    NATIVE_LAYOUT,
    ChatGLMHyper,
    as_id_list,
    glm_config_from_chatglm,
    glm_config_from_native,
    is_chatglm_config,
    parse_chatglm,
)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_HOW = "Point the LM at a glm-4-voice-9b directory (config.json, safetensors shards, tokenizer files)"


@dataclass
class LoadedModel:
    """A loaded LM and what the engine and GetInfo need to know about it."""

    model: GlmForCausalLM
    config: GlmConfig
    model_dir: Path
    model_id: str
    layout: str  # "chatglm" (published) or "glm" (native)
    device: torch.device
    dtype: torch.dtype
    vocab_size: int  # rows of the embedding / logits width (padded)
    max_context: int  # prompt + completion limit in tokens
    seq_length: int  # the checkpoint's own limit (ChatGLM seq_length / Glm max_position_embeddings)
    eos_token_ids: list[int]
    pad_token_id: int | None
    fingerprint: str
    num_parameters: int
    generation_config: dict[str, Any] = field(default_factory=dict)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or a torch dtype) → torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16") from None


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object; a missing or unreadable file is a CheckpointError naming it."""
    if not path.is_file():
        raise missing_checkpoint(path, what, _HOW)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------
# safetensors reading (one tensor at a time)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int, bytes]:
    """Return (tensor entries, offset of the data section, raw header bytes)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from exc
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if data_start + end > size or begin > end:
            raise CheckpointError(f"{path}: tensor {name} lies outside the file (truncated download?)")
        if entry["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    return header, data_start, raw


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, cpu tensor)`` in file order, reading each tensor into its own fresh buffer."""
    header, data_start, _ = read_safetensors_header(path)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with path.open("rb", buffering=0) as f:
        for name, entry in entries:
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
            nbytes = end - begin
            if tensor.numel() * tensor.element_size() != nbytes:
                raise CheckpointError(f"{path}: tensor {name} size does not match its shape")
            f.seek(data_start + begin)
            if nbytes:
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                got = 0
                while got < nbytes:
                    k = f.readinto(view[got:])
                    if not k:
                        raise CheckpointError(f"{path}: unexpected end of file in tensor {name}")
                    got += k
            yield name, tensor


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from the index if present, else ``model.safetensors``."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
        paths = [model_dir / name for name in files]
        for p in paths:
            if not p.is_file():
                raise missing_checkpoint(p, f"safetensors shard listed in {INDEX_FILE}", _HOW)
        return paths
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise missing_checkpoint(index_path, f"safetensors index ({INDEX_FILE}) or {SINGLE_FILE}", _HOW)


# ---------------------------------------------------------------------------------------------------
# key conversion

_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_SIMPLE = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_DROPPED = re.compile(r"(^|\.)rotary_pos_emb\.inv_freq$|(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$")


def convert_chatglm_tensor(
    name: str, tensor: torch.Tensor, hyper: ChatGLMHyper, path: Path
) -> list[tuple[str, torch.Tensor]]:
    """Map one ChatGLM tensor to its Glm name(s); [] for tensors that are dropped."""
    if _DROPPED.search(name):
        return []
    if name in _SIMPLE:
        return [(_SIMPLE[name], tensor)]
    m = _LAYER.match(name)
    if m:
        layer, rest = m.group(1), m.group(2)
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_SIMPLE:
            return [(prefix + _LAYER_SIMPLE[rest], tensor)]
        if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            q, kv = hyper.q_size, hyper.kv_size
            if tensor.shape[0] != q + 2 * kv:
                raise CheckpointError(
                    f"{path}: {name} has {tensor.shape[0]} rows, expected {q + 2 * kv} "
                    f"(= {hyper.num_attention_heads}·{hyper.kv_channels} + 2·{hyper.num_key_value_heads}·"
                    f"{hyper.kv_channels}); config.json does not match the weights"
                )
            kind = rest.rsplit(".", 1)[1]
            attn = prefix + "self_attn."
            return [
                (f"{attn}q_proj.{kind}", tensor[:q].clone()),
                (f"{attn}k_proj.{kind}", tensor[q : q + kv].clone()),
                (f"{attn}v_proj.{kind}", tensor[q + kv :].clone()),
            ]
    raise CheckpointError(f"{path}: unexpected tensor {name!r} in a ChatGLM checkpoint")


# ---------------------------------------------------------------------------------------------------
# loading


def _fingerprint(model_dir: Path, shards: list[Path]) -> str:
    """sha256 over the config files, the tokenizer files and every shard's header (names, shapes, offsets).

    Reading headers rather than all weights keeps this instant for a 19 GB checkpoint while still
    changing whenever the set of tensors, their shapes or the configuration change.
    """
    h = hashlib.sha256()
    for name in (CONFIG_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES):
        p = model_dir / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    for shard in shards:
        _, _, raw = read_safetensors_header(shard)
        h.update(shard.name.encode() + b"\0" + raw + str(shard.stat().st_size).encode())
    return "sha256:" + h.hexdigest()[:32]


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor, path: Path) -> None:
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise CheckpointError(f"{path}: tensor {name} has no place in the model (config mismatch?)") from None
    old = module._parameters.get(leaf)
    if old is None:
        raise CheckpointError(f"{path}: tensor {name} has no place in the model (config mismatch?)")
    if tuple(old.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(old.shape)}"
        )
    module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def load_model(
    model_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    max_context: int | None = None,
    model_id: str | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a checkpoint directory (published ChatGLM layout or native Glm) as an eval ``GlmForCausalLM``.

    ``max_context`` overrides the checkpoint's ``seq_length`` (the reference's hard limit).
    Raises CheckpointError naming the path for missing, truncated or mismatched files.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise missing_checkpoint(root, "LM checkpoint directory", _HOW)
    torch_dtype = resolve_dtype(dtype)
    dev = torch.device(device)
    config_path = root / CONFIG_FILE
    raw = read_json(config_path, "LM config.json")
    hyper: ChatGLMHyper | None = None
    if is_chatglm_config(raw):
        layout = CHATGLM_LAYOUT
        hyper = parse_chatglm(raw, config_path)
        cfg = glm_config_from_chatglm(hyper)
        seq_length = hyper.seq_length
    else:
        if raw.get("model_type") not in ("glm", None):
            raise CheckpointError(
                f"{config_path}: model_type {raw.get('model_type')!r} is neither 'chatglm' nor 'glm'"
            )
        layout = NATIVE_LAYOUT
        cfg = glm_config_from_native(raw, config_path)
        seq_length = int(cfg.max_position_embeddings)
    gen_cfg: dict[str, Any] = {}
    if (root / GENERATION_CONFIG_FILE).is_file():
        gen_cfg = read_json(root / GENERATION_CONFIG_FILE, "generation_config.json")
    eos = as_id_list(gen_cfg.get("eos_token_id")) or as_id_list(cfg.eos_token_id)
    eos = [e for e in eos if 0 <= e < cfg.vocab_size]
    limit = int(max_context) if max_context else seq_length
    cfg.max_position_embeddings = max(limit, seq_length)
    cfg._attn_implementation = attn_implementation
    shards = shard_files(root)

    with torch.device("meta"):
        model = GlmForCausalLM(cfg)
    for shard in shards:
        for name, tensor in iter_safetensors(shard):
            if hyper is not None:
                converted = convert_chatglm_tensor(name, tensor, hyper, shard)
            elif _DROPPED.search(name):
                converted = []
            else:
                converted = [(name, tensor)]
            del tensor
            for target, t in converted:
                _assign(model, target, t.to(device=dev, dtype=torch_dtype), shard)
            del converted
    if cfg.tie_word_embeddings and model.lm_head.weight.is_meta:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(
            f"{root}: checkpoint lacks {len(missing)} tensors the config requires, e.g. {missing[:3]} "
            f"(incomplete download or config.json mismatch)"
        )
    # Non-persistent rotary buffers were created on meta: rebuild them on the target device (fp32).
    rotary = type(model.model.rotary_emb)(cfg)
    model.model.rotary_emb = rotary.to(dev)
    model.config.dtype = torch_dtype
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        config=cfg,
        model_dir=root,
        model_id=model_id or root.resolve().name,
        layout=layout,
        device=dev,
        dtype=torch_dtype,
        vocab_size=int(cfg.vocab_size),
        max_context=limit,
        seq_length=seq_length,
        eos_token_ids=eos,
        pad_token_id=cfg.pad_token_id,
        fingerprint=_fingerprint(root, shards),
        num_parameters=sum(p.numel() for p in model.parameters()),
        generation_config=gen_cfg,
    )
