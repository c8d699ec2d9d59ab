"""The published tokenizer ``config.json`` (a Whisper config with the VQ fields) as typed settings.

The published file has ``model_type: "whisper"`` and the extra fields of the reference's
``WhisperVQConfig``. Only the fields that change inference are typed here; the whole dict is kept
in :attr:`WhisperVQConfig.raw` so a dev checkpoint can be written back key for key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmv_common.errors import CheckpointError

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class WhisperVQConfig:
    """Hyperparameters of the Whisper-VQ encoder that matter at inference."""

    d_model: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    encoder_layers: int
    num_mel_bins: int
    max_source_positions: int
    activation_function: str
    quantize_vocab_size: int
    quantize_position: int
    pooling_kernel_size: int | None
    pooling_type: str
    pooling_position: int
    quantize_causal_block_size: int | None
    quantize_encoder_only: bool
    quantize_causal_encoder: bool
    encoder_causal_attention: bool
    encoder_causal_convolution: bool
    quantize_ema_decay: float | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived quantities ------------------------------------------------------------------
    @property
    def num_layers_built(self) -> int:
        """Layers that exist at inference: everything up to the quantizer (as the reference loader)."""
        return self.quantize_position

    @property
    def pool(self) -> int:
        return self.pooling_kernel_size or 1

    @property
    def causal_layers(self) -> bool:
        return self.encoder_causal_attention or self.quantize_causal_encoder

    @property
    def max_token_positions(self) -> int:
        return math.ceil(self.max_source_positions / self.pool)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> WhisperVQConfig:
        def need(key: str) -> Any:
            if key not in data or data[key] is None:
                raise CheckpointError(
                    f"{source}: required field '{key}' is missing (expected a Whisper-VQ config)"
                )
            return data[key]

        model_type = data.get("model_type")
        if model_type != "whisper":
            raise CheckpointError(
                f"{source}: model_type is {model_type!r}, expected 'whisper' (Whisper-VQ tokenizer)"
            )
        pooling_kernel_size = data.get("pooling_kernel_size")
        cfg = cls(
            d_model=int(need("d_model")),
            encoder_attention_heads=int(need("encoder_attention_heads")),
            encoder_ffn_dim=int(need("encoder_ffn_dim")),
            encoder_layers=int(need("encoder_layers")),
            num_mel_bins=int(need("num_mel_bins")),
            max_source_positions=int(need("max_source_positions")),
            activation_function=str(data.get("activation_function", "gelu")),
            quantize_vocab_size=int(need("quantize_vocab_size")),
            quantize_position=int(data.get("quantize_position", 16)),
            pooling_kernel_size=None if pooling_kernel_size is None else int(pooling_kernel_size),
            pooling_type=str(data.get("pooling_type", "max")),
            pooling_position=int(data.get("pooling_position") or 0),
            quantize_causal_block_size=(
                None
                if data.get("quantize_causal_block_size") is None
                else int(data["quantize_causal_block_size"])
            ),
            quantize_encoder_only=bool(data.get("quantize_encoder_only", False)),
            quantize_causal_encoder=bool(data.get("quantize_causal_encoder", False)),
            encoder_causal_attention=bool(data.get("encoder_causal_attention", False)),
            encoder_causal_convolution=bool(data.get("encoder_causal_convolution", False)),
            quantize_ema_decay=None
            if data.get("quantize_ema_decay") is None
            else float(data["quantize_ema_decay"]),
            raw=dict(data),
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        problems: list[str] = []
        if self.d_model % self.encoder_attention_heads:
            problems.append("d_model must be divisible by encoder_attention_heads")
        if not 1 <= self.quantize_position <= self.encoder_layers:
            problems.append("quantize_position must be in 1..encoder_layers")
        if self.pooling_kernel_size is not None:
            if self.pooling_type not in ("avg", "max"):
                problems.append(f"pooling_type {self.pooling_type!r} is not 'avg' or 'max'")
            if not 1 <= self.pooling_position <= self.quantize_position:
                problems.append("pooling_position must be in 1..quantize_position")
        if self.quantize_causal_block_size is not None and self.quantize_causal_block_size < self.pool:
            problems.append("quantize_causal_block_size must be at least pooling_kernel_size")
        if self.activation_function not in ("gelu", "relu", "gelu_new", "silu"):
            problems.append(f"activation_function {self.activation_function!r} is not supported")
        if problems:
            raise CheckpointError(f"{source}: invalid Whisper-VQ config: " + "; ".join(problems))

    @classmethod
    def from_file(cls, path: Path) -> WhisperVQConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read {CONFIG_FILE}: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: {CONFIG_FILE} must hold a JSON object")
        return cls.from_dict(data, source=str(path))


# ---- the published files, for the dev writer ----------------------------------------------------


def published_config(
    *,
    d_model: int = 1280,
    encoder_layers: int = 32,
    encoder_attention_heads: int = 20,
    encoder_ffn_dim: int = 5120,
    quantize_position: int = 16,
    pooling_position: int = 16,
    quantize_vocab_size: int = 16384,
    num_mel_bins: int = 128,
    quantize_causal_block_size: int = 200,
    quantize_encoder_only: bool = True,
) -> dict[str, Any]:
    """The published ``glm-4-voice-tokenizer/config.json`` with selectable dimensions.

    Defaults are the published values (docs/architecture.md, "Tokenizer"); the Whisper-large-v3
    leftovers are kept so that a written file has the same key set as the real one.
    """
    return {
        "_name_or_path": "glm-4-voice-tokenizer",
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "apply_spec_augment": False,
        "architectures": ["WhisperVQEncoder"],
        "attention_dropout": 0.0,
        "begin_suppress_tokens": [220, 50257],
        "bos_token_id": 50257,
        "classifier_proj_size": 256,
        "d_model": d_model,
        "decoder_attention_heads": encoder_attention_heads,
        "decoder_ffn_dim": encoder_ffn_dim,
        "decoder_layerdrop": 0.0,
        "decoder_layers": encoder_layers,
        "decoder_start_token_id": 50258,
        "dropout": 0.0,
        "encoder_attention_heads": encoder_attention_heads,
        "encoder_causal_attention": False,
        "encoder_causal_convolution": True,
        "encoder_ffn_dim": encoder_ffn_dim,
        "encoder_layerdrop": 0.0,
        "encoder_layers": encoder_layers,
        "eos_token_id": 50257,
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "mask_feature_prob": 0.0,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_time_prob": 0.05,
        "max_length": 448,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "median_filter_width": 7,
        "model_type": "whisper",
        "num_hidden_layers": encoder_layers,
        "num_mel_bins": num_mel_bins,
        "pad_token_id": 50256,
        "pooling_kernel_size": 4,
        "pooling_position": pooling_position,
        "pooling_type": "avg",
        "quantize_causal_block_size": quantize_causal_block_size,
        "quantize_causal_encoder": False,
        "quantize_commit_coefficient": 0.25,
        "quantize_ema_decay": 0.99,
        "quantize_encoder_only": quantize_encoder_only,
        "quantize_loss_scale": 10.0,
        "quantize_position": quantize_position,
        "quantize_restart_interval": 100,
        "quantize_vocab_size": quantize_vocab_size,
        "scale_embedding": False,
        "skip_language_detection": True,
        "torch_dtype": "float32",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "use_weighted_layer_sum": False,
        "vocab_size": 51866,
    }


def published_preprocessor_config(num_mel_bins: int = 128) -> dict[str, Any]:
    """Whisper-large-v3 ``preprocessor_config.json`` (128 mel bins), as the tokenizer repo ships it."""
    return {
        "chunk_length": 30,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": num_mel_bins,
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "sampling_rate": 16000,
    }
