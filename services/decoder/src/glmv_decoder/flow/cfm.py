"""Conditional flow matching sampler (``flow.decoder``: ConditionalCFM).

Starts from Gaussian noise z ~ N(0, I) of the mel shape (drawn from the caller's ``torch.Generator``) and
integrates dx/dt = v(x, t) from t=0 to 1 with a fixed-step Euler solver on a cosine time grid
t_k = 1 - cos(pi/2 * k/n). Classifier-free guidance: v = (1 + r) v(x | mu, spks, cond) - r v(x | 0, 0, 0)
with r = ``inference_cfg_rate``.

The two guidance branches run as two batch-1 passes by default, which reproduces the reference's numbers
bit for bit; ``batch_guidance=True`` runs them as one batch of two (fewer, larger kernels: better on GPUs;
results then differ from the reference by float rounding, ~1e-6).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from glmv_decoder.config import CFMConfig
from glmv_decoder.flow.estimator import ConditionalDecoder

__all__ = ["ConditionalCFM", "time_grid"]


def time_grid(n_steps: int, scheduler: str, device: torch.device) -> torch.Tensor:
    """(n_steps + 1,) float32 time points in [0, 1]."""
    t = torch.linspace(0, 1, n_steps + 1, device=device)
    if scheduler == "cosine":
        t = 1 - torch.cos(t * 0.5 * torch.pi)
    return t


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) float32 noise from ``generator`` on the generator's device, moved/cast to ``like``."""
    z = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
    return z.to(device=like.device, dtype=like.dtype)


class ConditionalCFM(nn.Module):
    def __init__(self, cfg: CFMConfig, batch_guidance: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.batch_guidance = batch_guidance
        self.estimator = ConditionalDecoder(cfg.estimator)
        self._compiled: Any = None  # see ``compile_estimator``

    def compile_estimator(self, mode: str = "default", backend: str = "inductor") -> None:
        """Run the estimator (20 passes per chunk: the decoder's hot loop) through ``torch.compile``;
        ``mode="reduce-overhead"`` captures CUDA graphs. Shapes are dynamic; pad frames to a bucket
        (``FlowModel.pad_frames_to``) so the shapes repeat."""
        self._compiled = torch.compile(self.estimator, mode=None if mode == "default" else mode,
                                       backend=backend, dynamic=True)

    def _estimate(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                  cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One estimator pass (compiled if ``compile_estimator`` was called)."""
        fn = self._compiled if self._compiled is not None else self.estimator
        return fn(x, mu, t, spks, cond, mask, mask is not None)

    def forward(
        self,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator,
        n_timesteps: int = 10,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """mu, cond: (1, 80, T); spks: (1, 80) -> mel (1, 80, T). Draws one (1, 80, T) normal tensor."""
        x = draw_noise(tuple(mu.shape), generator, mu.new_empty(0, dtype=torch.float32)) * temperature
        return self.solve(x, mu, spks, cond, n_timesteps)

    def solve(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        n_timesteps: int = 10,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integrate from the noise x (B, 80, T). ``mask`` (B, 1, T): right padding of rows of different
        lengths (each row then equals its unpadded solution up to float rounding); None: no padding."""
        padded = mask is not None
        if padded:
            x = x * mask
        # Two or more rows always run both guidance branches as one batch of 2B rows (padded or not):
        # the batched path is not bit-exact anyway, and halving the estimator calls is most of its gain.
        batched_rows = x.shape[0] > 1
        # The Euler state stays float32 whatever the estimator's dtype (a no-op for float32 models): with
        # bfloat16/float16 weights only the velocity is computed in half precision.
        x = x.float()
        dtype = next(self.estimator.parameters()).dtype

        def velocity(xs: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
            return self._estimate(xs.to(dtype), *rest).float()

        t_span = time_grid(n_timesteps, self.cfg.t_scheduler, mu.device)
        rate = self.cfg.inference_cfg_rate
        guided = rate > 0
        batched = guided and (self.batch_guidance or batched_rows)
        mu0, spks0, cond0 = torch.zeros_like(mu), torch.zeros_like(spks), torch.zeros_like(cond)
        b = x.shape[0]
        if batched:
            mu_b, spks_b, cond_b = torch.cat([mu, mu0]), torch.cat([spks, spks0]), torch.cat([cond, cond0])
            mask_b = None if mask is None else torch.cat([mask, mask])
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            if batched:
                v_both = velocity(torch.cat([x, x]), mu_b, t, spks_b, cond_b, mask_b)
                v = (1.0 + rate) * v_both[:b] - rate * v_both[b:]
            else:
                v = velocity(x, mu, t, spks, cond, mask)
                if guided:
                    v = (1.0 + rate) * v - rate * velocity(x, mu0, t, spks0, cond0, mask)
            x = x + dt * v
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x
