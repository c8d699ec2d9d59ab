"""The Whisper-VQ encoder: log-mel frames in, 12.5 Hz speech-token ids out (pure PyTorch).

Built around transformers' ``WhisperEncoderLayer`` (pre-LN block, q/v/out projections with bias,
k without), which takes an additive 4-D mask. Everything around the layers is ours, because the
stock ``WhisperEncoder`` demands 3000 input frames and has none of the VQ parts:

* causal convolutions (2 zeros of left padding, no right padding) when the config says so;
* absolute positions ``embed_positions[:T/2]``, restarting at 0 for every 30 s window;
* a block-causal additive mask (frame i sees frames j <= i and its whole own block), a plain
  key-padding mask without a block size, or a causal mask for causal layers;
* only the first ``quantize_position`` layers; average (or max) pooling after ``pooling_position``;
* nearest code by squared L2 (``|c|^2 + |x|^2 - 2 x.c``, first index wins ties) -> token ids.

Parameter names follow the published ``model.safetensors`` (bare keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from .config import WhisperVQConfig


class CausalConv1d(nn.Conv1d):
    """A Conv1d that pads ``dilation * (kernel - 1)`` zeros on the left only (no lookahead)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.left_padding = self.dilation[0] * (kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_padding, 0)))


@dataclass
class EncoderOutput:
    token_ids: torch.Tensor  # [B, T/8] int64, ids at every pooled position (valid or not)
    token_mask: torch.Tensor  # [B, T/8] bool, which ids belong to real audio
    hidden: (
        torch.Tensor
    )  # [B, T/8, d] codebook vectors + embed_positions2 (the reference's last_hidden_state)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's position table: sin block then cos block, log-spaced timescales up to 10000."""
    half = channels // 2
    inc = math.log(10000.0) / (half - 1)
    inv = torch.exp(-inc * torch.arange(half, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _layer_config(cfg: WhisperVQConfig) -> WhisperConfig:
    hf = WhisperConfig(
        d_model=cfg.d_model,
        encoder_attention_heads=cfg.encoder_attention_heads,
        encoder_ffn_dim=cfg.encoder_ffn_dim,
        encoder_layers=cfg.quantize_position,
        num_mel_bins=cfg.num_mel_bins,
        max_source_positions=cfg.max_source_positions,
        activation_function=cfg.activation_function,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    hf._attn_implementation = "sdpa"
    return hf


class WhisperVQEncoder(nn.Module):
    """Encoder truncated at the quantizer, with the published parameter names."""

    def __init__(self, cfg: WhisperVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.encoder_causal_convolution:
            self.conv1: nn.Conv1d = CausalConv1d(cfg.num_mel_bins, d, 3)
            self.conv2: nn.Conv1d = CausalConv1d(d, d, 3, stride=2)
        else:
            self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, 3, padding=1)
            self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.embed_positions.requires_grad_(False)
        layer_cfg = _layer_config(cfg)
        self.layers = nn.ModuleList([WhisperEncoderLayer(layer_cfg) for _ in range(cfg.num_layers_built)])
        self.pooling: nn.Module | None = None
        if cfg.pooling_kernel_size is not None:
            pool_cls = nn.AvgPool1d if cfg.pooling_type == "avg" else nn.MaxPool1d
            self.pooling = pool_cls(kernel_size=cfg.pooling_kernel_size)
        self.codebook = nn.Embedding(cfg.quantize_vocab_size, d)
        self.embed_positions2 = nn.Embedding(cfg.max_token_positions, d)

    # ---- masks ---------------------------------------------------------------------------------
    def _additive_mask(self, valid: torch.Tensor, block: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, S, S] additive mask (0 = attend, dtype-min = blocked) for the non-causal layers."""
        _, s = valid.shape
        if block is not None:
            idx = torch.arange(s, device=valid.device)
            allowed = (idx[None, :] <= idx[:, None]) | ((idx[:, None] // block) == (idx[None, :] // block))
            allowed = allowed[None, :, :] & valid[:, None, :]
        else:
            allowed = valid[:, None, :].expand(-1, s, -1)
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
        blocked.masked_fill_(~allowed, torch.finfo(dtype).min)
        return blocked[:, None, :, :]

    def _causal_mask(self, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        blocked = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
        return blocked[None, None, :, :]

    def _mask_for(self, valid: torch.Tensor, block: int | None, dtype: torch.dtype) -> torch.Tensor:
        if self.cfg.causal_layers:  # the reference drops the padding mask and uses pure causal SDPA
            return self._causal_mask(valid.shape[1], dtype, valid.device)
        return self._additive_mask(valid, block, dtype)

    # ---- forward -------------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous states at the quantizer [B, T/8, d] and the pooled frame validity [B, T/8]."""
        cfg = self.cfg
        _, _, t = features.shape
        stride = self.conv1.stride[0] * self.conv2.stride[0]
        if t % (stride * cfg.pool):
            raise ValueError(f"frame count {t} is not a multiple of {stride * cfg.pool}")
        seq = t // stride
        if seq > cfg.max_source_positions:
            raise ValueError(
                f"{seq} encoder positions exceed max_source_positions={cfg.max_source_positions}"
            )
        dtype = self.conv1.weight.dtype
        valid = frame_mask[:, ::stride].bool()
        block = cfg.quantize_causal_block_size
        mask = self._mask_for(valid, block, dtype)

        x = F.gelu(self.conv1(features.to(dtype)))
        x = F.gelu(self.conv2(x))
        x = x.permute(0, 2, 1) + self.embed_positions.weight[:seq]
        # the layers built are exactly those before the quantizer (quantize_position of them)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if self.pooling is not None and i + 1 == cfg.pooling_position:
                k = cfg.pool
                x = x.permute(0, 2, 1)
                if x.shape[-1] % k:
                    x = F.pad(x, (0, k - x.shape[-1] % k))
                x = self.pooling(x).permute(0, 2, 1)
                valid = valid[:, ::k]
                if i + 1 < len(self.layers):
                    mask = self._mask_for(valid, None if block is None else block // k, dtype)
        return x, valid

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> EncoderOutput:
        """``features`` [B, mels, T] (T a multiple of 8), ``frame_mask`` [B, T] (1 = real audio)."""
        x, valid = self.encode(features, frame_mask)
        ids = nearest_code(x, self.codebook.weight)
        hidden = self.codebook(ids) + self.embed_positions2.weight[: ids.shape[1]]
        return EncoderOutput(token_ids=ids, token_mask=valid, hidden=hidden)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code by squared L2, in fp32; ``torch.min`` keeps the first index on ties.

    Same expression as the reference (``|c|^2 + |x|^2 - 2 x c^T`` in one addmm), so fp32 ids match
    bit for bit; with bf16/fp16 weights the distances are still computed in fp32.
    """
    b, n, d = x.shape
    flat = x.reshape(-1, d).float()
    cb = codebook.float()
    dist = torch.addmm(
        cb.pow(2).sum(dim=1) + flat.pow(2).sum(dim=1, keepdim=True), flat, cb.t(), beta=1.0, alpha=-2.0
    )
    return torch.min(dist, dim=1).indices.reshape(b, n)
