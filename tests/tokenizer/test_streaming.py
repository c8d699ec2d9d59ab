"""Streaming tokenization: early tokens per completed block, the rest at the end."""

from __future__ import annotations

import numpy as np
import pytest

from glmv_common.errors import InvalidRequest
from glmv_tokenizer.streaming import StreamingTokenizer
from glmv_tokenizer.tokenizer import SpeechTokenizer

from .conftest import speech


def _stream(
    tokenizer: SpeechTokenizer, audio: np.ndarray, chunk: int
) -> tuple[list[int], list[tuple[int, int]]]:
    st = StreamingTokenizer(tokenizer)
    tokens: list[int] = []
    arrivals: list[tuple[int, int]] = []
    for start in range(0, len(audio), chunk):
        new = st.feed(audio[start : start + chunk])
        if new:
            arrivals.append((start + chunk, len(new)))
        tokens += new
    tokens += st.finish()
    return tokens, arrivals


@pytest.mark.parametrize(("seconds", "chunk"), [(2.0, 1600), (9.1, 3333), (31.7, 16000)])
def test_stream_equals_whole_when_floor_is_fixed(
    tokenizer: SpeechTokenizer, seconds: float, chunk: int
) -> None:
    audio = speech(30, seconds)
    tokens, _ = _stream(tokenizer, audio, chunk)
    assert tokens == tokenizer.tokenize_batch([audio])[0]


def test_block_tokens_arrive_early(tokenizer: SpeechTokenizer) -> None:
    audio = speech(31, 9.0)
    _, arrivals = _stream(tokenizer, audio, 1000)
    # block k (50 tokens) is final once 64000 (k+1) + 200 samples have arrived
    assert arrivals == [(65000, 50), (129000, 50)]


def test_full_window_is_final_at_30s(tokenizer: SpeechTokenizer) -> None:
    audio = speech(32, 31.0)
    st = StreamingTokenizer(tokenizer)
    first = st.feed(audio[:480000])
    assert len(first) == 375
    assert first + st.feed(audio[480000:]) + st.finish() == tokenizer.tokenize_batch([audio])[0]


def test_finish_twice_and_after_finish(tokenizer: SpeechTokenizer) -> None:
    st = StreamingTokenizer(tokenizer)
    st.feed(speech(33, 1.0))
    assert len(st.finish()) == 13
    assert st.finish() == []
    with pytest.raises(InvalidRequest):
        st.feed(np.zeros(10, dtype=np.float32))


def test_stream_length_limit(tokenizer: SpeechTokenizer) -> None:
    st = StreamingTokenizer(tokenizer, max_seconds=1.0)
    st.feed(np.zeros(16000, dtype=np.float32))
    with pytest.raises(InvalidRequest, match="maximum"):
        st.feed(np.zeros(1, dtype=np.float32))
