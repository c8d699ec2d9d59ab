"""SpeechTokenizer: 16 kHz mono float32 audio in, GLM-4-Voice speech-token ids out (no gRPC here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from glmv_common import audio as gaudio
from glmv_common.errors import AudioError, InvalidRequest

from .checkpoint import LoadedCheckpoint, load_checkpoint
from .features import SAMPLE_RATE, FeaturePipeline, WindowFeatures, stack

DEFAULT_MAX_SECONDS = 600.0


@dataclass(frozen=True)
class WindowRequest:
    """One window (<= 30 s at 16 kHz) to tokenize alone, zero-padded to ``pad_to`` samples first."""

    audio: np.ndarray
    pad_to: int | None = None


@dataclass(frozen=True)
class TokenizerInfo:
    codebook_size: int
    token_rate_hz: float
    sample_rate: int
    fingerprint: str
    model_id: str
    device: str
    dtype: str
    block_tokens: int | None  # tokens per block-causal block (50), None without a block size
    extra: dict[str, str] = field(default_factory=dict)


def prepare_audio(
    samples: np.ndarray, sample_rate: int = SAMPLE_RATE, max_seconds: float = DEFAULT_MAX_SECONDS
) -> np.ndarray:
    """Validate any-rate mono or ``[frames, channels]`` audio and return 16 kHz mono float32.

    First channel only, as the reference. Raises AudioError (empty, NaN/inf, bad rate, bad dtype)
    or InvalidRequest (longer than ``max_seconds``). Silence is fine.
    """
    rate = gaudio.check_sample_rate(sample_rate)
    arr = gaudio.check_samples(samples)
    seconds = arr.shape[0] / rate
    if seconds > max_seconds:
        raise InvalidRequest(f"audio is {seconds:.1f} s long; the maximum is {max_seconds:g} s")
    mono = gaudio.first_channel(arr)
    return np.ascontiguousarray(gaudio.resample(mono, rate, SAMPLE_RATE), dtype=np.float32)


class SpeechTokenizer:
    """The Whisper-VQ tokenizer with the reference's windowing; thread-compatible, not thread-safe."""

    def __init__(
        self, checkpoint: LoadedCheckpoint, device: str = "cpu", max_windows_per_forward: int = 32
    ) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.config = checkpoint.config
        self.device = torch.device(device)
        conv_stride = self.model.conv1.stride[0] * self.model.conv2.stride[0]
        self.frames_per_token = conv_stride * self.config.pool
        self.pipeline = FeaturePipeline(checkpoint.preprocessor, self.frames_per_token)
        self.max_windows_per_forward = max(1, max_windows_per_forward)
        block = self.config.quantize_causal_block_size
        streamable = (
            block is not None and self.config.encoder_causal_convolution and not self.config.causal_layers
        )
        self.block_tokens = block // self.config.pool if streamable else None
        self.info = TokenizerInfo(
            codebook_size=self.config.quantize_vocab_size,
            token_rate_hz=SAMPLE_RATE / self.pipeline.samples_per_token,
            sample_rate=SAMPLE_RATE,
            fingerprint=checkpoint.fingerprint,
            model_id=checkpoint.model_id,
            device=str(self.device),
            dtype=str(self.model.conv1.weight.dtype).removeprefix("torch."),
            block_tokens=self.block_tokens,
            extra={"layout": checkpoint.layout, "layers": str(self.config.num_layers_built)},
        )

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path | None,
        device: str = "cpu",
        dtype: str = "float32",
        max_windows_per_forward: int = 32,
    ) -> SpeechTokenizer:
        return cls(load_checkpoint(model_dir, device, dtype), device, max_windows_per_forward)

    @property
    def samples_per_token(self) -> int:
        return self.pipeline.samples_per_token

    @property
    def window_samples(self) -> int:
        return self.pipeline.window_samples

    def expected_tokens(self, num_samples: int) -> int:
        return self.pipeline.num_tokens(num_samples)

    # ---- core ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_windows(self, windows: list[WindowFeatures]) -> list[list[int]]:
        """One forward per group of windows (padded to the longest); valid ids of each window."""
        results: list[list[int]] = []
        step = self.max_windows_per_forward
        for start in range(0, len(windows), step):
            group = windows[start : start + step]
            feats, mask = stack(group)
            out = self.model(torch.from_numpy(feats).to(self.device), torch.from_numpy(mask).to(self.device))
            ids = out.token_ids.cpu().numpy()
            keep = out.token_mask.cpu().numpy()
            results.extend(ids[i][keep[i]].tolist() for i in range(len(group)))
        return results

    def tokenize_batch(self, audios: list[np.ndarray | WindowRequest]) -> list[list[int]]:
        """16 kHz mono float32 arrays -> token ids per array (empty array -> empty list).

        Items may also be :class:`WindowRequest` (one window, used by streaming). All windows of all
        items share forwards; results do not depend on the batch composition.
        """
        windows: list[WindowFeatures] = []
        owners: list[int] = []
        for i, item in enumerate(audios):
            if isinstance(item, WindowRequest):
                found = [self.pipeline.window(item.audio, item.pad_to)] if len(item.audio) else []
            else:
                arr = np.asarray(item, dtype=np.float32)
                if arr.ndim != 1:
                    raise AudioError(f"tokenize_batch expects 1-D 16 kHz mono arrays, got shape {arr.shape}")
                found = self.pipeline.utterance(arr)
            for w in found:
                windows.append(w)
                owners.append(i)
        tokens: list[list[int]] = [[] for _ in audios]
        # longest first so groups pad little; order of windows within an utterance is kept by owner+index
        order = sorted(range(len(windows)), key=lambda k: -windows[k].num_frames)
        ids = self.run_windows([windows[k] for k in order])
        by_window: dict[int, list[int]] = dict(zip(order, ids, strict=True))
        for k in range(len(windows)):
            tokens[owners[k]].extend(by_window[k])
        return tokens

    def tokenize(
        self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, max_seconds: float = DEFAULT_MAX_SECONDS
    ) -> list[int]:
        """Validate, resample to 16 kHz, tokenize one utterance."""
        return self.tokenize_batch([prepare_audio(samples, sample_rate, max_seconds)])[0]
