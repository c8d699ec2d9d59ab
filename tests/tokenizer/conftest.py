"""Tokenizer test fixtures: one tiny dev checkpoint per session, written in the published layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from glmv_tokenizer.checkpoint import synthetic_audio, write_dev_checkpoint
from glmv_tokenizer.tokenizer import SpeechTokenizer


@pytest.fixture(scope="session")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dev_checkpoint(tmp_path_factory.mktemp("tok") / "dev", seed=0)


@pytest.fixture(scope="session")
def tokenizer(dev_dir: Path) -> SpeechTokenizer:
    return SpeechTokenizer.from_dir(dev_dir)


def speech(seed: int, seconds: float, loud_start: bool = True) -> np.ndarray:
    """Synthetic test audio; with ``loud_start`` each 30 s window opens with its loudest sound, so the
    per-window log-mel floor is already fixed after the first block."""
    audio = synthetic_audio(seed, seconds)
    if loud_start:
        for start in range(0, len(audio), 480000):
            n = min(4000, len(audio) - start)
            audio[start : start + n] = 0.99 * np.sign(np.sin(np.arange(n) / 7.0))
    return audio
