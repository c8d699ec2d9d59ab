"""One collector of reply audio: ``audio.delta`` events in, the reply's samples (or a WAV) out."""

from __future__ import annotations

import numpy as np

from glmv_common import audio as audio_io
from glmv_gateway.conversation.events import AudioDelta


class ReplyAudio:
    def __init__(self) -> None:
        self._chunks: list[AudioDelta] = []

    def add(self, delta: AudioDelta) -> None:
        self._chunks.append(delta)

    def __bool__(self) -> bool:
        return bool(self._chunks)

    @property
    def sample_rate(self) -> int | None:
        return self._chunks[0].sample_rate if self._chunks else None

    @property
    def encoding(self) -> str | None:
        return self._chunks[0].encoding if self._chunks else None

    def raw(self) -> bytes:
        """The samples in the output encoding, in order."""
        return b"".join(c.data for c in sorted(self._chunks, key=lambda c: c.seq))

    def pcm(self) -> np.ndarray:
        """Mono float32 samples."""
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return audio_io.decode_pcm(self.raw(), self._chunks[0].encoding)[:, 0]

    def wav(self) -> bytes:
        if not self._chunks:
            return b""
        return audio_io.encode_wav(self.pcm(), self._chunks[0].sample_rate)
