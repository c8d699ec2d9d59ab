"""HiFT vocoder (neural source filter + iSTFT), as configured by GLM-4-Voice's decoder ``config.yaml``.

mel (1, 80, T) at 22050/256 Hz  ->  waveform (1, 256*T) at 22050 Hz.

Pipeline: an F0 predictor (5 weight-normed convs + ELU, then a linear head) gives F0 per mel frame; F0 is
repeated to the sample rate and drives a harmonic sine source (fundamental + ``nb_harmonics`` overtones,
random initial phases, additive noise) merged by Linear+tanh. The source's STFT is fused into an upsampling
HiFi-GAN trunk (Snake ResBlocks); the trunk predicts log-magnitude and phase of an ``n_fft``-point spectrum
and an inverse STFT yields the samples.

The module and parameter names reproduce the published ``hift.pt`` state dict exactly, including the legacy
weight-norm keys ``<module>.weight_g`` / ``<module>.weight_v`` (see ``WNConv1d``).

Randomness: the reference draws the sine phases and the noise from torch's *global* RNG (reproducible only
because its flow call reseeds it just before). Here every draw comes from the ``torch.Generator`` passed to
``inference``, with the same shapes in the same order, so a generator in the same state gives the same
numbers as the reference without touching process-wide RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SAMPLES_PER_FRAME",
    "F0PredictorConfig",
    "HiFTConfig",
    "HiFTGenerator",
]

#: Samples per mel frame for the published configuration (upsample 8*8, iSTFT hop 4).
SAMPLES_PER_FRAME = 256


@dataclass(frozen=True)
class F0PredictorConfig:
    """``hift.f0_predictor`` (ConvRNNF0Predictor) of the published config."""

    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512


@dataclass(frozen=True)
class HiFTConfig:
    """The ``hift`` section of the published ``config.yaml`` (defaults = published values)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    istft_params: dict[str, int] = field(default_factory=lambda: {"n_fft": 16, "hop_len": 4})
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = field(default_factory=F0PredictorConfig)

    def __post_init__(self) -> None:
        # Normalise lists from YAML into tuples so the config is hashable/comparable.
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                     "source_resblock_kernel_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
            object.__setattr__(self, name, tuple(tuple(int(d) for d in ds) for ds in getattr(self, name)))
        object.__setattr__(self, "istft_params", {k: int(v) for k, v in dict(self.istft_params).items()})
        if isinstance(self.f0_predictor, dict):
            object.__setattr__(self, "f0_predictor", F0PredictorConfig(**self.f0_predictor))
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("hift: upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("hift: resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if len(self.source_resblock_kernel_sizes) != len(self.upsample_rates):
            raise ValueError("hift: one source resblock per upsample stage is required")
        if set(self.istft_params) != {"n_fft", "hop_len"}:
            raise ValueError("hift: istft_params must have exactly n_fft and hop_len")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HiFTConfig:
        """Build from a parsed ``hift`` mapping; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"hift: unknown config keys {sorted(unknown)}")
        return cls(**d)

    @property
    def n_fft(self) -> int:
        return self.istft_params["n_fft"]

    @property
    def hop_len(self) -> int:
        return self.istft_params["hop_len"]

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.hop_len


def _mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class WNConv1d(nn.Module):
    """Conv1d / ConvTranspose1d with weight normalisation stored as the legacy ``weight_g``/``weight_v`` pair.

    weight = g * v / ||v|| with the norm over every dimension except 0 (``torch.nn.utils.weight_norm``'s
    default ``dim=0``; for a transposed conv, dim 0 is the *input* channel). The folded weight is cached and
    recomputed only when ``g`` or ``v`` change (load_state_dict, training), so inference pays nothing for it.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, transposed: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        self.stride, self.padding, self.dilation = stride, padding, dilation
        shape = (in_ch, out_ch, kernel) if transposed else (out_ch, in_ch, kernel)
        # Registration order = the published state-dict order: bias, weight_g, weight_v.
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.weight_g = nn.Parameter(torch.empty(shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(shape))
        nn.init.normal_(self.weight_v, 0.0, 0.01)  # the reference's init_weights (irrelevant once loaded)
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(1, 2), keepdim=True))
        self._cache: tuple[tuple[int, int, int, int, torch.device, torch.dtype], torch.Tensor] | None = None

    def weight(self) -> torch.Tensor:
        v, g = self.weight_v, self.weight_g
        key = (v.data_ptr(), v._version, g.data_ptr(), g._version, v.device, v.dtype)
        if self._cache is None or self._cache[0] != key or torch.is_grad_enabled():
            w = torch._weight_norm(v, g, 0)
            if torch.is_grad_enabled():
                return w
            self._cache = (key, w.detach())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding)
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class Snake(nn.Module):
    """y = x + sin²(αx)/(α + 1e-9), one α per channel (linear scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)


class ResBlock(nn.Module):
    """Snake → dilated conv → Snake → conv, residual, once per dilation."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (B, 1, T): right padding, kept at zero after every conv (x must be zero there)."""
        layers = zip(self.convs1, self.convs2, self.activations1, self.activations2, strict=True)
        for c1, c2, a1, a2 in layers:
            h = c1(a1(x)) if mask is None else c1(a1(x)) * mask
            x = x + (c2(a2(h)) if mask is None else c2(a2(h)) * mask)
        return x


class F0Predictor(nn.Module):
    """ConvRNNF0Predictor: 5 × (weight-normed conv k3 + ELU) then Linear; |·| gives F0 in Hz per frame."""

    def __init__(self, cfg: F0PredictorConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(WNConv1d(cfg.in_channels if i == 0 else cfg.cond_channels, cfg.cond_channels, 3,
                                   padding=1))
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.cond_channels, cfg.num_class)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            h = self.condnet(mel)
        else:  # right-padded batch: padded frames are zeroed after every conv, as the unpadded zero padding
            h = mel * mask
            for layer in self.condnet:
                h = layer(h)
                if isinstance(layer, nn.ELU):
                    h = h * mask
        return self.classifier(h.transpose(1, 2)).squeeze(-1).abs()


class SourceModule(nn.Module):
    """Harmonic-plus-noise NSF source: 1 + nb_harmonics sines from F0, merged by Linear + tanh.

    Random draws, in the reference's order: harmonic initial phases U(−π, π) (1, H, 1) with the fundamental's
    set to 0; Gaussian noise (1, H, L); then the (unused) noise-branch Gaussian (1, L, 1), drawn only so a
    shared generator advances exactly as the reference's global RNG does.
    """

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    @torch.no_grad()
    def sines(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """f0 (1, 1, L) Hz at the sample rate → harmonic excitation (1, H, L), float32."""
        cfg = self.cfg
        h = cfg.nb_harmonics + 1
        dev = f0.device
        mult = torch.arange(1, h + 1, device=dev, dtype=torch.float32)[None, :, None]
        freq = f0 * mult / cfg.sampling_rate  # normalised instantaneous frequency per harmonic
        theta = 2 * math.pi * (torch.cumsum(freq, dim=-1) % 1)
        low = torch.tensor(-math.pi, dtype=torch.float32, device=dev)
        high = torch.tensor(math.pi, dtype=torch.float32, device=dev)
        u = torch.rand((f0.shape[0], h, 1), generator=generator, device=dev, dtype=torch.float32)
        phase = low + u * (high - low)
        phase[:, 0, :] = 0
        sine = cfg.nsf_alpha * torch.sin(theta + phase)
        uv = (f0 > cfg.nsf_voiced_threshold).to(torch.float32)
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        noise = noise_amp * torch.randn(sine.shape, generator=generator, device=dev, dtype=torch.float32)
        return sine * uv + noise

    def forward(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """f0 (1, 1, L) → source (1, 1, L)."""
        sines = self.sines(f0, generator)
        merged = torch.tanh(self.l_linear(sines.transpose(1, 2).to(self.l_linear.weight.dtype)))
        # The reference also draws a noise-branch tensor it never uses; keep the generator in step.
        torch.randn((f0.shape[0], f0.shape[-1], 1), generator=generator, device=f0.device,
                    dtype=torch.float32)
        return merged.transpose(1, 2)


class HiFTGenerator(nn.Module):
    """HiFT generator with the published module layout. Always used in eval mode (no dropout exists)."""

    def __init__(self, cfg: HiFTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or HiFTConfig()
        self.cfg = cfg
        base = cfg.base_channels
        n_stages = len(cfg.upsample_rates)
        self.m_source = SourceModule(cfg)
        self.conv_pre = WNConv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConv1d(base // 2**i, base // 2 ** (i + 1), k, stride=u, padding=(k - u) // 2, transposed=True)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        # The source spectrum (n_fft + 2 channels at the iSTFT frame rate) is brought to each stage's rate.
        cum = [1]
        for r in reversed(cfg.upsample_rates[1:]):
            cum.append(cum[-1] * r)
        spec_ch = cfg.n_fft + 2
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(reversed(cum), cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes, strict=True)):
            ch = base // 2 ** (i + 1)
            if u == 1:
                self.source_downs.append(nn.Conv1d(spec_ch, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(spec_ch, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(n_stages)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = WNConv1d(base // 2**n_stages, spec_ch, 7, padding=3)
        self.f0_predictor = F0Predictor(cfg.f0_predictor)
        # Periodic Hann window (== scipy get_window('hann', n, fftbins=True) cast to float32); not a buffer,
        # so it is not part of the state dict, as in the reference.
        self._window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64).float()
        self.eval()

    # -- helpers --------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> HiFTGenerator:
        """Inference-only module: always stays in eval mode."""
        return super().train(False)

    def _win(self, device: torch.device) -> torch.Tensor:
        if self._window.device != device:
            self._window = self._window.to(device)
        return self._window

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        n, hop = self.cfg.n_fft, self.cfg.hop_len
        spec = torch.stft(x, n, hop, n, window=self._win(x.device), return_complex=True)
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        n, hop = self.cfg.n_fft, self.cfg.hop_len
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, n, hop, n, window=self._win(magnitude.device))

    def source(self, mel: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """mel (1, 80, T) → NSF source (1, 1, T * samples_per_frame)."""
        f0 = self.f0_predictor(mel)  # (1, T)
        f0 = f0[:, None, :].float().repeat_interleave(self.cfg.samples_per_frame, dim=-1)
        return self.m_source(f0, generator)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The filter: mel (1, 80, T) and source (1, 1, L) → waveform (1, L)."""
        cfg = self.cfg
        s_stft = self._stft(source.squeeze(1).float()).to(mel.dtype)
        x = self.conv_pre(mel)
        n_stages, n_k = len(self.ups), len(cfg.resblock_kernel_sizes)
        for i in range(n_stages):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](x)
            if i == n_stages - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * n_k](x)
            for j in range(1, n_k):
                xs = xs + self.resblocks[i * n_k + j](x)
            x = xs / n_k
        x = F.leaky_relu(x)  # default slope 0.01 here, as in the reference
        x = self.conv_post(x).float()
        half = cfg.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :half, :])
        phase = torch.sin(x[:, half:, :])  # the reference feeds sin(raw) as the phase, in radians
        y = self._istft(magnitude, phase)
        return torch.clamp(y, -cfg.audio_limit, cfg.audio_limit)

    # -- public ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode ``mel`` (1, 80, T).

        ``cache_source`` (1, 1, S), S ≤ T·256: replaces the first S samples of the NSF source (the streaming
        driver passes the last 256 source samples of the previous chunk so the re-synthesised overlap frame
        uses the same excitation). ``generator`` supplies the random phases/noise (a fresh one seeded 42 if
        omitted). Returns (speech (1, T·256) float32, source (1, 1, T·256) float32).
        """
        if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != self.cfg.in_channels:
            raise ValueError(f"hift: mel must be (1, {self.cfg.in_channels}, T), got {tuple(mel.shape)}")
        if mel.shape[2] == 0:
            raise ValueError("hift: empty mel")
        param = self.conv_pre.weight_v
        mel = mel.to(device=param.device, dtype=param.dtype)
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(42)
        s = self.source(mel, generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            n = cache_source.shape[-1]
            if n > s.shape[-1]:
                raise ValueError(f"hift: cache_source ({n} samples) longer than the source ({s.shape[-1]})")
            s = s.clone()
            s[:, :, :n] = cache_source.to(device=s.device, dtype=s.dtype)
        speech = self.decode(mel, s)
        return speech.float(), s.float()

    @torch.inference_mode()
    def inference_batch(
        self,
        mels: list[torch.Tensor],
        cache_sources: list[torch.Tensor | None],
        generators: list[torch.Generator],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``inference`` for several streams in one batched call; row i equals
        ``inference(mels[i], cache_sources[i], generators[i])`` up to float rounding.

        Rows of different lengths are right-padded; padded positions are zeroed after every convolution so
        each row sees the zero padding its unpadded call sees. The NSF source (random draws from each
        row's own generator, in the unbatched order and shapes), the source STFT and the output iSTFT (both
        centred with reflect padding at each row's own end) run per row; the convolutional trunk runs
        batched.
        """
        n = len(mels)
        if not n or not len(cache_sources) == len(generators) == n:
            raise ValueError("hift: inference_batch needs one cache_source and generator per mel")
        param = self.conv_pre.weight_v
        dev, dtype = param.device, param.dtype
        cfg = self.cfg
        for mel in mels:
            if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != cfg.in_channels or not mel.shape[2]:
                raise ValueError(f"hift: mel must be (1, {cfg.in_channels}, T>0), got {tuple(mel.shape)}")
        spf = cfg.samples_per_frame
        lens = [int(m.shape[2]) for m in mels]
        t_max = max(lens)
        mel = torch.zeros(n, cfg.in_channels, t_max, device=dev, dtype=dtype)
        for i, m in enumerate(mels):
            mel[i, :, : lens[i]] = m[0].to(device=dev, dtype=dtype)

        padded = min(lens) < t_max  # rows of one length (streams in step) need no masking

        def mask_of(scale: int, extra: int = 0) -> torch.Tensor | None:
            if not padded:
                return None
            width = t_max * scale + extra
            idx = torch.arange(width, device=dev)[None, None, :]
            real = torch.tensor([t * scale + extra for t in lens], device=dev)[:, None, None]
            return (idx < real).to(dtype)

        f0 = self.f0_predictor(mel, mask_of(1))  # (B, T)
        sources, stfts = [], []
        for i in range(n):
            f0_i = f0[i : i + 1, None, : lens[i]].float().repeat_interleave(spf, dim=-1)
            s = self.m_source(f0_i, generators[i])
            cs = cache_sources[i]
            if cs is not None and cs.shape[-1] > 0:
                k = cs.shape[-1]
                if k > s.shape[-1]:
                    raise ValueError(f"hift: cache_source ({k} samples) longer than the source "
                                     f"({s.shape[-1]})")
                s = s.clone()
                s[:, :, :k] = cs.to(device=s.device, dtype=s.dtype)
            sources.append(s)
            stfts.append(self._stft(s.squeeze(1).float()).to(dtype)[0])
        frames_extra = 1  # the centred STFT of 256·T samples has 64·T + 1 frames (hop 4)
        s_stft = torch.zeros(n, stfts[0].shape[0], t_max * spf // cfg.hop_len + frames_extra, device=dev,
                             dtype=dtype)
        for i, st in enumerate(stfts):
            s_stft[i, :, : st.shape[1]] = st

        x = _mask(self.conv_pre(mel), mask_of(1))
        n_stages, n_k = len(self.ups), len(cfg.resblock_kernel_sizes)
        scale = 1
        for i in range(n_stages):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](x)
            scale *= cfg.upsample_rates[i]
            extra = 0
            if i == n_stages - 1:
                x = F.pad(x, (1, 0), mode="reflect")
                extra = 1
            m = mask_of(scale, extra)
            x = _mask(x, m)
            x = x + self.source_resblocks[i](_mask(self.source_downs[i](s_stft), m), m)
            xs = self.resblocks[i * n_k](x, m)
            for j in range(1, n_k):
                xs = xs + self.resblocks[i * n_k + j](x, m)
            x = xs / n_k
        x = F.leaky_relu(x)
        x = self.conv_post(x).float()
        half = cfg.n_fft // 2 + 1
        out = []
        for i in range(n):
            xi = x[i : i + 1, :, : lens[i] * scale + 1]
            y = self._istft(torch.exp(xi[:, :half, :]), torch.sin(xi[:, half:, :]))
            speech = torch.clamp(y, -cfg.audio_limit, cfg.audio_limit)
            out.append((speech.float(), sources[i].float()))
        return out
