"""Flow-matching velocity estimator (``flow.decoder.estimator``: ConditionalDecoder).

A 1-D U-Net over mel frames: input channels are [x, mu, speaker, cond] (4 x 80), a sinusoidal time
embedding + MLP conditions every ResNet block, and each resolution level has ``n_blocks`` self-attention
transformer blocks. Layout for ``channels = (c0, c1)``: down0 (full res, then stride-2 conv), down1 (half
res, plain conv), ``num_mid_blocks`` mid levels (half res), up0 (skip from down1, transposed-conv upsample),
up1 (skip from down0, plain conv), final Block1D + 1x1 projection.

Parameter names follow the published ``flow.pt`` (``decoder.estimator.*``); the transformer blocks use the
names of diffusers' ``BasicTransformerBlock`` (``norm1``, ``attn1.to_q/to_k/to_v/to_out.0``, ``norm3``,
``ff.net.0.proj``, ``ff.net.2``). Dropout rates in the published config are 0; dropout is omitted.

Masks: GLM inference never pads (batch of one full-length sequence), so ``mask=None`` (the default) skips
every mask multiplication and attends without a mask. With an explicit (B, 1, T) 0/1 mask the reference
semantics are kept, including its quirk of handing the float 0/1 outer-product mask to attention as an
*additive* bias. ``padded=True`` instead treats the mask as right padding of a batch of streams of
different lengths: GroupNorm statistics are taken over each row's real frames only and attention never
looks at padded keys, so every row equals its unpadded batch-1 result up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glmv_decoder.config import EstimatorConfig

__all__ = ["ConditionalDecoder", "sinusoidal_time_embedding"]


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """t (B,) or () -> (B, dim): [sin(scale*t*w_k), cos(scale*t*w_k)], w_k = exp(-ln(1e4) k / (dim/2 - 1))."""
    if t.dim() < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)
    arg = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def masked_group_norm(x: torch.Tensor, norm: nn.GroupNorm, mask: torch.Tensor) -> torch.Tensor:
    """GroupNorm of x (B, C, T) whose statistics ignore the frames where mask (B, 1, T) is 0."""
    b, c, t = x.shape
    g = norm.num_groups
    out_dtype = x.dtype
    m = mask.view(b, 1, 1, t).float()
    xg = x.float().view(b, g, c // g, t)  # statistics in float32, as GroupNorm's kernels accumulate
    count = m.sum(dim=(2, 3), keepdim=True) * (c // g)
    mean = (xg * m).sum(dim=(2, 3), keepdim=True) / count
    centred = xg - mean
    var = (centred * centred * m).sum(dim=(2, 3), keepdim=True) / count
    y = (centred * torch.rsqrt(var + norm.eps)).view(b, c, t).to(out_dtype)
    if norm.affine:
        y = torch.addcmul(norm.bias[None, :, None], y, norm.weight[None, :, None])
    return y


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class Block1D(nn.Module):
    """Conv1d(k3) -> GroupNorm(8) -> Mish, on masked input, masked output."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish()
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, padded: bool = False) -> torch.Tensor:
        if not padded or mask is None:
            return _masked(self.block(_masked(x, mask)), mask)
        conv, norm, act = self.block
        return act(masked_group_norm(conv(x * mask), norm, mask)) * mask


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, temb: torch.Tensor, padded: bool = False
    ) -> torch.Tensor:
        h = self.block1(x, mask, padded)
        h = h + self.mlp(temb).unsqueeze(-1)
        h = self.block2(h, mask, padded)
        return h + self.res_conv(_masked(x, mask))


class Downsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SelfAttention(nn.Module):
    """diffusers ``Attention`` layout: bias-free q/k/v, ``to_out`` = [Linear, Dropout]."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(x).view(b, n, self.heads, -1).transpose(1, 2)
        v = self.to_v(x).view(b, n, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` layout: net = [GELU(proj), Dropout, Linear]."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Self-attention-only ``BasicTransformerBlock`` (layer_norm variant): norm1/attn1, norm3/ff."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


def _transformers(cfg: EstimatorConfig, dim: int) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks)
    )


def _attention_bias(
    mask: torch.Tensor | None, x: torch.Tensor, heads: int, padded: bool = False
) -> torch.Tensor:
    if mask is not None and padded:
        # Padding of a batch: the same +1 as the unpadded path on real keys (identical rounding), -inf on
        # padded keys. Shape (B, 1, 1, T), broadcast over heads and queries.
        keys = mask[:, 0, :].to(x.dtype)
        bias = torch.where(keys > 0, torch.ones_like(keys), torch.full_like(keys, float("-inf")))
        return bias[:, None, None, :]
    if mask is None:
        # The reference adds an all-ones float mask to the scores (a no-op for softmax, but it changes the
        # rounding). A stride-0 view of a single 1.0 reproduces its numbers bit for bit without
        # materialising a dense (B, heads, T, T) tensor.
        n = x.shape[1]
        return torch.ones(1, 1, 1, 1, dtype=x.dtype, device=x.device).expand(x.shape[0], heads, n, n)
    # Reference quirk: the 0/1 outer product is passed as an additive float bias, one per batch item.
    return torch.matmul(mask.transpose(1, 2), mask).unsqueeze(1)


class ConditionalDecoder(nn.Module):
    """U-Net velocity field v(x, t | mu, spks, cond): (B, 80, T) -> (B, 80, T)."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        channels = tuple(cfg.channels)
        self.in_channels = cfg.in_channels
        temb_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(cfg.in_channels, temb_dim)
        self.down_blocks = nn.ModuleList()
        self.mid_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        out_ch = cfg.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            down: nn.Module = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Downsample1D(out_ch)
            self.down_blocks.append(
                nn.ModuleList([ResnetBlock1D(in_ch, out_ch, temb_dim), _transformers(cfg, out_ch), down])
            )
        for _ in range(cfg.num_mid_blocks):
            self.mid_blocks.append(
                nn.ModuleList([ResnetBlock1D(channels[-1], out_ch, temb_dim), _transformers(cfg, out_ch)])
            )
        up_channels = (*channels[::-1], channels[0])
        for i in range(len(up_channels) - 1):
            in_ch, out_ch = up_channels[i] * 2, up_channels[i + 1]
            last = i == len(up_channels) - 2
            up: nn.Module = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Upsample1D(out_ch)
            self.up_blocks.append(
                nn.ModuleList([ResnetBlock1D(in_ch, out_ch, temb_dim), _transformers(cfg, out_ch), up])
            )
        self.final_block = Block1D(up_channels[-1], up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], cfg.out_channels, 1)

    @staticmethod
    def _run_transformers(
        x: torch.Tensor, blocks: nn.ModuleList, mask: torch.Tensor | None, padded: bool = False
    ) -> torch.Tensor:
        h = x.transpose(1, 2).contiguous()
        bias = _attention_bias(mask, h, blocks[0].attn1.heads, padded) if len(blocks) else None
        for block in blocks:
            h = block(h, bias)
        return h.transpose(1, 2).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        padded: bool = False,
    ) -> torch.Tensor:
        """x, mu, cond: (B, 80, T); t: () or (B,); spks: (B, 80); mask: (B, 1, T) or None (no padding);
        ``padded``: the mask marks right padding of rows of different lengths (see the module doc)."""
        temb = self.time_mlp(sinusoidal_time_embedding(t, self.in_channels).to(x.dtype))
        spk = spks.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        h = torch.cat([x, mu, spk, cond], dim=1)

        skips = []
        masks = [mask]
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            h = self._run_transformers(resnet(h, m, temb, padded), blocks, m, padded)
            skips.append(h)
            h = down(_masked(h, m))
            masks.append(None if m is None else m[:, :, ::2])
        masks.pop()
        m_mid = masks[-1]
        for resnet, blocks in self.mid_blocks:
            h = self._run_transformers(resnet(h, m_mid, temb, padded), blocks, m_mid, padded)
        m_up = mask
        for resnet, blocks, up in self.up_blocks:
            m_up = masks.pop()
            skip = skips.pop()
            h = torch.cat([h[:, :, : skip.shape[-1]], skip], dim=1)
            h = self._run_transformers(resnet(h, m_up, temb, padded), blocks, m_up, padded)
            h = up(_masked(h, m_up))
        h = self.final_block(h, m_up, padded)
        out = self.final_proj(_masked(h, m_up))
        return _masked(out, mask)
