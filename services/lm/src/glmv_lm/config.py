"""LM settings and the published ChatGLM ``config.json`` → transformers ``GlmConfig`` mapping.

The published ``glm-4-voice-9b/config.json`` uses the ChatGLM remote-code field names
(``num_layers``, ``ffn_hidden_size``, ``kv_channels``, ``multi_query_group_num``, ``padded_vocab_size``,
``seq_length``, ``rope_ratio`` ...). We never execute that remote code: the fields are read here and
mapped onto transformers' native :class:`~transformers.GlmConfig`:

* ``head_dim = kv_channels``; q rows = ``num_attention_heads * kv_channels``;
* ``num_key_value_heads = multi_query_group_num`` when ``multi_query_attention`` else the head count;
* RoPE on the first half of each head (``partial_rotary_factor=0.5``), interleaved pairs (the HF Glm
  rotary does this), base ``10000 * rope_ratio`` (the upstream converter ignores ``rope_ratio``; we
  do not);
* ``rms_norm_eps = layernorm_epsilon``; ``max_position_embeddings = seq_length``; untied ``lm_head``.

Variants of the architecture the native model cannot express (LayerNorm instead of RMSNorm, biases
on the dense layers, post-LN residuals, NeoX-style rope) are rejected with a CheckpointError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from transformers import GlmConfig

from glmv_common.errors import CheckpointError
from glmv_common.settings import ServiceSettings

CHATGLM_LAYOUT = "chatglm"
NATIVE_LAYOUT = "glm"


class LMSettings(ServiceSettings):
    """Settings of the LM service (environment prefix ``GLMV_LM_``)."""

    model_config = SettingsConfigDict(env_prefix="GLMV_LM_", extra="ignore", protected_namespaces=())

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    max_context: int | None = Field(
        None, ge=16, description="Context window in tokens; default: the checkpoint's seq_length."
    )
    model_id: str | None = Field(
        None, description="Model id reported by GetInfo; default: the directory name."
    )
    attn_implementation: str = Field("sdpa", description="transformers attention backend (sdpa, eager).")
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together by the batching loop.")
    max_new_tokens: int = Field(2000, ge=1, description="Default cap on generated tokens per request.")
    max_audio_tokens: int | None = Field(None, ge=1, description="Default cap on audio tokens per reply.")


@dataclass(frozen=True)
class ChatGLMHyper:
    """The ChatGLM ``config.json`` fields the conversion needs (published names)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    kv_channels: int
    num_attention_heads: int
    multi_query_attention: bool
    multi_query_group_num: int
    padded_vocab_size: int
    seq_length: int
    rope_ratio: float
    add_qkv_bias: bool
    layernorm_epsilon: float
    eos_token_id: list[int]
    pad_token_id: int | None

    @property
    def num_key_value_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.kv_channels


# Published defaults of the remote ChatGLMConfig, used only when a key is absent from config.json.
_CHATGLM_DEFAULTS: dict[str, Any] = {
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "seq_length": 2048,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "multi_query_attention": False,
    "multi_query_group_num": 1,
    "rope_ratio": 1,
    "original_rope": True,
}


def as_id_list(value: Any) -> list[int]:
    """Normalise an ``eos_token_id`` entry (int, list or None) to a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def is_chatglm_config(raw: dict[str, Any]) -> bool:
    """True for the published ChatGLM layout, False for an already-converted native Glm config."""
    if raw.get("model_type") == "glm":
        return False
    return raw.get("model_type") == "chatglm" or "num_layers" in raw or "padded_vocab_size" in raw


def parse_chatglm(raw: dict[str, Any], path: Path) -> ChatGLMHyper:
    """Read and validate the ChatGLM fields of ``config.json`` at ``path``."""

    def get(key: str) -> Any:
        return raw.get(key, _CHATGLM_DEFAULTS.get(key))

    unsupported = []
    if not get("rmsnorm"):
        unsupported.append("rmsnorm=false (LayerNorm)")
    if get("add_bias_linear"):
        unsupported.append("add_bias_linear=true")
    if get("apply_residual_connection_post_layernorm"):
        unsupported.append("apply_residual_connection_post_layernorm=true")
    if not get("post_layer_norm"):
        unsupported.append("post_layer_norm=false")
    if not get("original_rope"):
        unsupported.append("original_rope=false")
    if unsupported:
        raise CheckpointError(
            f"{path}: ChatGLM variant not supported by the native GLM model: {', '.join(unsupported)}"
        )
    try:
        hyper = ChatGLMHyper(
            num_layers=int(get("num_layers")),
            hidden_size=int(get("hidden_size")),
            ffn_hidden_size=int(get("ffn_hidden_size")),
            kv_channels=int(get("kv_channels") or get("hidden_size") // get("num_attention_heads")),
            num_attention_heads=int(get("num_attention_heads")),
            multi_query_attention=bool(get("multi_query_attention")),
            multi_query_group_num=int(get("multi_query_group_num")),
            padded_vocab_size=int(get("padded_vocab_size")),
            seq_length=int(get("seq_length")),
            rope_ratio=float(get("rope_ratio")),
            add_qkv_bias=bool(get("add_qkv_bias")),
            layernorm_epsilon=float(get("layernorm_epsilon")),
            eos_token_id=as_id_list(raw.get("eos_token_id")),
            pad_token_id=raw.get("pad_token_id"),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed ChatGLM config.json field: {exc}") from exc
    if hyper.num_attention_heads % hyper.num_key_value_heads:
        raise CheckpointError(
            f"{path}: num_attention_heads={hyper.num_attention_heads} is not a multiple of "
            f"multi_query_group_num={hyper.num_key_value_heads}"
        )
    return hyper


def glm_config_from_chatglm(hyper: ChatGLMHyper, max_position_embeddings: int | None = None) -> GlmConfig:
    """The native GlmConfig equivalent to a ChatGLM checkpoint."""
    pad = hyper.pad_token_id
    if pad is not None and not 0 <= pad < hyper.padded_vocab_size:
        pad = None
    return GlmConfig(
        vocab_size=hyper.padded_vocab_size,
        hidden_size=hyper.hidden_size,
        intermediate_size=hyper.ffn_hidden_size,
        num_hidden_layers=hyper.num_layers,
        num_attention_heads=hyper.num_attention_heads,
        num_key_value_heads=hyper.num_key_value_heads,
        head_dim=hyper.kv_channels,
        max_position_embeddings=max_position_embeddings or hyper.seq_length,
        rms_norm_eps=hyper.layernorm_epsilon,
        attention_bias=hyper.add_qkv_bias,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * hyper.rope_ratio,
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=pad,
        eos_token_id=hyper.eos_token_id or None,
        bos_token_id=None,
        use_cache=True,
    )


def glm_config_from_native(raw: dict[str, Any], path: Path) -> GlmConfig:
    """A native transformers Glm ``config.json`` (already converted)."""
    fields = {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("architectures",)}
    fields.pop("model_type", None)
    fields.pop("transformers_version", None)
    try:
        cfg = GlmConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed Glm config.json: {exc}") from exc
    pad = cfg.pad_token_id
    if pad is not None and not 0 <= pad < cfg.vocab_size:
        cfg.pad_token_id = None
    return cfg
