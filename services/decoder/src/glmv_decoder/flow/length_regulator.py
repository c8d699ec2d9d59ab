"""Token-rate features -> mel-rate features (``flow.length_regulator``: InterpolateRegulator).

Nearest-neighbour resampling along time to the target frame count, then ``len(sampling_ratios)`` groups of
[Conv1d k3 -> GroupNorm -> Mish] and a final 1x1 Conv1d (``model.0`` .. ``model.{3g}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmv_decoder.config import LengthRegulatorConfig

__all__ = ["InterpolateRegulator"]


class InterpolateRegulator(nn.Module):
    def __init__(self, cfg: LengthRegulatorConfig) -> None:
        super().__init__()
        ch = cfg.channels
        out = cfg.out_channels or ch
        layers: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            layers += [nn.Conv1d(ch, ch, 3, 1, 1), nn.GroupNorm(cfg.groups, ch), nn.Mish()]
        layers.append(nn.Conv1d(ch, out, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B, N, C) -> (B, frames, C_out)."""
        h = F.interpolate(x.transpose(1, 2).contiguous(), size=frames, mode="nearest")
        return self.model(h).transpose(1, 2).contiguous()
