"""Block-causal Conformer encoder of the flow (``flow.encoder``: BlockConformerEncoder).

Token embeddings (N, 512) -> contextual features (N, 512). Pre-norm layers of relative-position
multi-head self-attention (Transformer-XL style, ESPnet "new" relative positions) and a SiLU feed-forward;
no convolution module, no macaron feed-forward. Attention is *block causal*: token i sees token j iff
j <= i or j is in the same ``block_size`` block as i (blocks counted from the start of the sequence),
i.e. iff j < (i // block_size + 1) * block_size.

Parameter names follow the published ``flow.pt`` (``encoder.embed.out.*``, ``encoder.encoders.{i}.*``,
``encoder.after_norm.*``). Inference only: dropout layers of the original are omitted (eval semantics).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glmv_decoder.config import EncoderConfig

__all__ = ["BlockConformerEncoder", "block_causal_mask", "relative_position_table"]


def relative_position_table(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoids for relative positions +(length-1) .. -(length-1), shape (1, 2*length-1, dim).

    Even channels hold sin(p * w_k), odd channels cos(p * w_k), w_k = 10000^(-2k/dim). Computed in float32
    with the same operation order as the reference table, then cast.
    """
    pos = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    ahead = torch.zeros(length, dim)
    behind = torch.zeros(length, dim)
    ahead[:, 0::2] = torch.sin(pos * inv_freq)
    ahead[:, 1::2] = torch.cos(pos * inv_freq)
    behind[:, 0::2] = torch.sin(-1 * pos * inv_freq)
    behind[:, 1::2] = torch.cos(-1 * pos * inv_freq)
    table = torch.cat([torch.flip(ahead, [0]), behind[1:]], dim=0).unsqueeze(0)
    return table.to(device=device, dtype=dtype)


def block_causal_mask(length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Boolean (length, length) mask, True where query i may attend to key j."""
    idx = torch.arange(length, device=device)
    limit = (torch.div(idx, block_size, rounding_mode="floor") + 1) * block_size
    return idx.unsqueeze(0) < limit.unsqueeze(1)


class LinearInput(nn.Module):
    """``embed``: Linear -> LayerNorm, then scale by sqrt(d) (positional module has no parameters)."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * self.xscale
        pos = relative_position_table(x.shape[1], x.shape[2], x.device, x.dtype)
        return x, pos


class BlockRelPositionAttention(nn.Module):
    """Multi-head self-attention with relative positions (u/v biases) and a block-causal mask."""

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True) -> None:
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.d_k))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.linear_q(x).view(b, n, self.h, self.d_k)
        k = self.linear_k(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos).view(pos.shape[0], -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))  # (b, h, n, n)
        position = torch.matmul(q_v, p.transpose(-2, -1)).contiguous()  # (b, h, n, 2n-1)
        # Column (n-1) - i + j of row i holds relative position i - j: read it through a strided view.
        width = 2 * n - 1
        position = position.as_strided(
            (b, self.h, n, n),
            (self.h * n * width, n * width, width - 1, 1),
            position.storage_offset() + n - 1,
        )
        scores = (content + position) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    """``feed_forward``: w_2(SiLU(w_1(x)))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm layer: x + MHA(LN(x)); then x + FFN(LN(x))."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.output_size
        self.self_attn = BlockRelPositionAttention(cfg.attention_heads, d, cfg.key_bias)
        self.feed_forward = FeedForward(d, cfg.linear_units)
        self.norm_ff = nn.LayerNorm(d, eps=1e-5)
        self.norm_mha = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos, allowed)
        return x + self.feed_forward(self.norm_ff(x))


class BlockConformerEncoder(nn.Module):
    """(B, N, input_size) -> (B, N, output_size).

    ``lengths`` (B,): real length of each right-padded row; padded keys are masked out of attention, so a
    row's real positions equal its unpadded result (relative positions depend on i - j only)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.embed = LinearInput(cfg.input_size, cfg.output_size)
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        xs, pos = self.embed(xs)
        allowed = block_causal_mask(xs.shape[1], self.block_size, xs.device)
        if lengths is not None:
            keys = torch.arange(xs.shape[1], device=xs.device)[None, :] < lengths.to(xs.device)[:, None]
            allowed = allowed[None, None] & keys[:, None, None, :]  # (B, 1, N, N)
        for layer in self.encoders:
            xs = layer(xs, pos, allowed)
        return self.after_norm(xs)
