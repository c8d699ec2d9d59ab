"""Waveform -> log-mel windows, exactly as the reference driver prepares them.

Reference semantics (``speech_tokenizer/utils.py: extract_speech_token``):

* 16 kHz mono; the utterance is cut into 30 s windows ``[t, t + 30 s)`` tokenized independently;
* the windows of one utterance go through ``WhisperFeatureExtractor`` together with
  ``padding="longest"`` and ``pad_to_multiple_of=1280`` (= conv strides x pool x hop), so each is
  zero-padded to the longest window rounded up to 1280 samples; the frame mask is the sample mask
  taken every hop (frame i is real iff ``160 i < len``);
* log-mel maths of the feature extractor (floor at ``max - 8`` per window, over padded frames too).

We run the feature extractor once per utterance, on the same padded windows as the reference, and
then trim each window's frames to its own ``ceil(len / 1280) * 8``. Frames after that never reach a
real token (causal convolutions, masked keys), so this is exact, and it makes an utterance's
tokens independent of which other utterances share its model batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import WhisperFeatureExtractor

SAMPLE_RATE = 16000
WINDOW_SECONDS = 30

_FE_KEYS = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value", "dither")


@dataclass
class WindowFeatures:
    features: np.ndarray  # [mels, T] float32, T a multiple of frames_per_token
    frame_mask: np.ndarray  # [T] int32, 1 for real audio
    num_samples: int  # real samples in the window

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[1])


class FeaturePipeline:
    """Windowing, padding and log-mel extraction for one checkpoint."""

    def __init__(self, preprocessor: dict[str, Any], frames_per_token: int) -> None:
        kwargs = {k: preprocessor[k] for k in _FE_KEYS if k in preprocessor}
        self.extractor = WhisperFeatureExtractor(**kwargs)
        self.hop = int(self.extractor.hop_length)
        self.frames_per_token = frames_per_token  # conv strides x pool = 8 mel frames
        self.samples_per_token = frames_per_token * self.hop  # 1280
        self.window_samples = WINDOW_SECONDS * SAMPLE_RATE

    def split(self, audio: np.ndarray) -> list[np.ndarray]:
        """30 s windows, as the reference cuts them (no window for empty audio)."""
        return [audio[s : s + self.window_samples] for s in range(0, len(audio), self.window_samples)]

    def num_tokens(self, num_samples: int) -> int:
        """Tokens the reference yields for ``num_samples`` real samples at 16 kHz."""
        full, rest = divmod(num_samples, self.window_samples)
        per_window = self.window_samples // self.samples_per_token
        return full * per_window + -(-rest // self.samples_per_token)

    def windows(self, segments: list[np.ndarray]) -> list[WindowFeatures]:
        """Features of windows that the reference would batch together (one utterance's windows)."""
        if not segments:
            return []
        out = self.extractor(
            [np.asarray(s, dtype=np.float32) for s in segments],
            sampling_rate=SAMPLE_RATE,
            return_attention_mask=True,
            return_tensors="np",
            padding="longest",
            pad_to_multiple_of=self.samples_per_token,
            device="cpu",
        )
        feats = np.asarray(out["input_features"], dtype=np.float32)
        mask = np.asarray(out["attention_mask"], dtype=np.int32)
        result = []
        for i, seg in enumerate(segments):
            frames = -(-len(seg) // self.samples_per_token) * self.frames_per_token
            result.append(WindowFeatures(feats[i, :, :frames], mask[i, :frames], len(seg)))
        return result

    def window(self, segment: np.ndarray, pad_to: int | None = None) -> WindowFeatures:
        """Features of one window that the reference would pad to ``pad_to`` samples in its batch.

        ``pad_to`` is the padded length of the longest window batched with it (for the last window
        of an utterance longer than 30 s: the full 30 s); None means the window's own length.
        """
        n = len(segment)
        if not 0 < n <= self.window_samples:
            raise ValueError(f"a window holds 1..{self.window_samples} samples, got {n}")
        own = -(-n // self.samples_per_token) * self.samples_per_token
        padded = np.zeros(max(own, pad_to or 0), dtype=np.float32)
        padded[:n] = segment
        out = self.extractor(
            [padded], sampling_rate=SAMPLE_RATE, return_tensors="np", padding="longest", device="cpu"
        )
        frames = own // self.hop
        mask = (np.arange(frames) * self.hop < n).astype(np.int32)
        return WindowFeatures(np.asarray(out["input_features"][0, :, :frames], dtype=np.float32), mask, n)

    def utterance(self, audio: np.ndarray) -> list[WindowFeatures]:
        return self.windows(self.split(audio))


def stack(windows: list[WindowFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """Pad windows to the longest (zeros, mask 0) -> features [B, mels, T], mask [B, T]."""
    t = max(w.num_frames for w in windows)
    mels = windows[0].features.shape[0]
    feats = np.zeros((len(windows), mels, t), dtype=np.float32)
    mask = np.zeros((len(windows), t), dtype=np.int32)
    for i, w in enumerate(windows):
        feats[i, :, : w.num_frames] = w.features
        mask[i, : w.num_frames] = w.frame_mask
    return feats, mask
