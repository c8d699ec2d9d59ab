"""Input validation before tokenization."""

from __future__ import annotations

import numpy as np
import pytest

from glmv_common.errors import AudioError, InvalidRequest
from glmv_tokenizer.tokenizer import SpeechTokenizer, prepare_audio


@pytest.mark.parametrize(
    ("samples", "rate", "error", "match"),
    [
        (np.zeros(0, dtype=np.float32), 16000, AudioError, "empty"),
        (np.array([0.0, np.nan], dtype=np.float32), 16000, AudioError, "NaN"),
        (np.array([0.0, np.inf], dtype=np.float32), 16000, AudioError, "infinite"),
        (np.zeros(100, dtype=np.float32), 7999, AudioError, "out of range"),
        (np.zeros(100, dtype=np.float32), 192001, AudioError, "out of range"),
        (np.array(["a", "b"]), 16000, AudioError, "numeric"),
        (np.zeros((2, 2, 2), dtype=np.float32), 16000, AudioError, "shape"),
    ],
)
def test_bad_audio(samples: np.ndarray, rate: int, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        prepare_audio(samples, rate)


def test_too_long() -> None:
    with pytest.raises(InvalidRequest, match="maximum"):
        prepare_audio(np.zeros(16000 * 3, dtype=np.float32), 16000, max_seconds=2.0)
    assert len(prepare_audio(np.zeros(16000 * 2, dtype=np.float32), 16000, max_seconds=2.0)) == 32000


def test_rates_at_the_limits() -> None:
    assert len(prepare_audio(np.zeros(8000, dtype=np.float32), 8000)) == 16000
    assert len(prepare_audio(np.zeros(192000, dtype=np.float32), 192000)) == 16000


def test_tokenize_batch_rejects_2d(tokenizer: SpeechTokenizer) -> None:
    with pytest.raises(AudioError, match="1-D"):
        tokenizer.tokenize_batch([np.zeros((100, 2), dtype=np.float32)])
