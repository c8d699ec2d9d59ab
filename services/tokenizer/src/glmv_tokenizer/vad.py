"""Silero voice activity detection: one TorchScript model per process, state per stream.

The model is the JIT file shipped inside the published ``silero-vad`` package (nothing is
downloaded). Its 16 kHz sub-network is called directly with an explicit recurrent state, so one
loaded model serves any number of streams: each :class:`VadStream` owns its state and the last 64
samples of context that the model expects in front of every 512-sample (32 ms) window.
All model calls run in one dedicated worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import metrics

SAMPLE_RATE = 16000
WINDOW = 512  # samples per model call at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window prepended to each call
WINDOW_MS = WINDOW * 1000 // SAMPLE_RATE


class SileroModel:
    """The process-wide model and the thread that runs it."""

    _lock = threading.Lock()
    _instance: SileroModel | None = None

    def __init__(self) -> None:
        threads = torch.get_num_threads()
        from silero_vad import load_silero_vad  # its import pins torch to one thread: undo that

        torch.set_num_threads(threads)
        with warnings.catch_warnings():  # the package's loader uses deprecated resource/JIT calls
            warnings.simplefilter("ignore", DeprecationWarning)
            full = load_silero_vad(onnx=False)
        full.eval()
        self._net = full._model  # the 16 kHz network: (context + window, state) -> (prob, state)
        self.context = int(self._net.context_size_samples)
        if self.context != CONTEXT:
            raise RuntimeError(f"unexpected Silero context size {self.context}")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="silero-vad")

    @classmethod
    def shared(cls) -> SileroModel:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run_windows(self, windows: np.ndarray, state: torch.Tensor, context: np.ndarray) -> tuple[
        np.ndarray, torch.Tensor, np.ndarray
    ]:
        """Speech probability of each ``[n, 512]`` window, in order; returns the new state/context."""
        probs = np.empty(len(windows), dtype=np.float32)
        started = time.perf_counter()
        with torch.inference_mode():
            for i, window in enumerate(windows):
                x = torch.from_numpy(np.concatenate([context, window])[None, :])
                out, state = self._net(x, state)
                probs[i] = float(out[0, 0])
                context = window[-CONTEXT:]
        metrics.VAD_MODEL_SECONDS.inc(time.perf_counter() - started)
        metrics.VAD_AUDIO_SECONDS.inc(len(windows) * WINDOW / SAMPLE_RATE)
        return probs, state, context

    async def run(self, windows: np.ndarray, state: torch.Tensor, context: np.ndarray) -> tuple[
        np.ndarray, torch.Tensor, np.ndarray
    ]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_windows, windows, state, context)


class VadStream:
    """One stream's detector input: re-buffers 16 kHz audio into 32 ms windows and scores them."""

    def __init__(self, model: SileroModel) -> None:
        self._model = model
        self._pending = np.zeros(0, dtype=np.float32)
        self.position = 0  # stream sample index of the first sample of ``_pending``
        self.reset()

    def reset(self) -> None:
        """Forget the recurrent state (the window grid keeps its place in the stream)."""
        self._state = torch.zeros(2, 1, 128)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    async def push(self, samples: np.ndarray) -> list[tuple[int, float]]:
        """Append audio; returns ``(start sample, probability)`` of every window completed by it."""
        if len(samples):
            self._pending = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        n = len(self._pending) // WINDOW
        if n == 0:
            return []
        windows = self._pending[: n * WINDOW].reshape(n, WINDOW)
        self._pending = self._pending[n * WINDOW :]
        probs, self._state, self._context = await self._model.run(windows, self._state, self._context)
        start = self.position
        self.position += n * WINDOW
        return [(start + i * WINDOW, float(p)) for i, p in enumerate(probs)]

    def skip(self, samples: np.ndarray) -> None:
        """Advance over audio that is not scored (detection off), keeping the window grid."""
        pending = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        n = len(pending) // WINDOW
        self.position += n * WINDOW
        self._pending = pending[n * WINDOW :]


__all__ = ["CONTEXT", "SAMPLE_RATE", "WINDOW", "WINDOW_MS", "SileroModel", "VadStream"]
