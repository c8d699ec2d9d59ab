"""Tokenizer behaviour on the dev checkpoint: counts, batching, windows, determinism, block causality."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from glmv_tokenizer.checkpoint import write_dev_checkpoint
from glmv_tokenizer.model import nearest_code
from glmv_tokenizer.tokenizer import SpeechTokenizer

from .conftest import speech


@pytest.mark.parametrize("samples", [1, 1279, 1280, 1281, 16000, 63999, 64000, 480000, 480001, 481281])
def test_token_count_law(tokenizer: SpeechTokenizer, samples: int) -> None:
    audio = speech(1, samples / 16000 + 0.01, loud_start=False)[:samples]
    tokens = tokenizer.tokenize_batch([audio])[0]
    windows = [min(480000, samples - s) for s in range(0, samples, 480000)]
    assert len(tokens) == sum(math.ceil(w / 1280) for w in windows) == tokenizer.expected_tokens(samples)
    assert all(0 <= t < tokenizer.info.codebook_size for t in tokens)


def test_one_second_is_13_tokens(tokenizer: SpeechTokenizer) -> None:
    assert len(tokenizer.tokenize(np.zeros(16000, dtype=np.float32))) == 13
    assert tokenizer.info.token_rate_hz == 12.5 and tokenizer.info.sample_rate == 16000


def test_empty_array_gives_no_tokens(tokenizer: SpeechTokenizer) -> None:
    assert tokenizer.tokenize_batch([np.zeros(0, dtype=np.float32)]) == [[]]


def test_batch_equals_single(tokenizer: SpeechTokenizer) -> None:
    audios = [speech(s, secs) for s, secs in [(2, 0.7), (3, 5.3), (4, 12.1), (5, 33.0), (6, 2.0)]]
    single = [tokenizer.tokenize_batch([a])[0] for a in audios]
    assert tokenizer.tokenize_batch(audios) == single
    assert tokenizer.tokenize_batch(audios[::-1]) == single[::-1]
    assert len({tuple(t) for t in single}) == len(single)  # the inputs really differ


def test_small_forward_groups_change_nothing(dev_dir) -> None:
    audios = [speech(s, secs) for s, secs in [(2, 0.7), (5, 33.0), (6, 2.0)]]
    big = SpeechTokenizer.from_dir(dev_dir, max_windows_per_forward=32).tokenize_batch(audios)
    assert SpeechTokenizer.from_dir(dev_dir, max_windows_per_forward=1).tokenize_batch(audios) == big


def test_30s_windows_are_independent(tokenizer: SpeechTokenizer) -> None:
    audio = speech(7, 31.0)  # 1 s in the second window: 16000 % 1280 leaves > 200 samples of padding
    tokens = tokenizer.tokenize_batch([audio])[0]
    first = tokenizer.tokenize_batch([audio[:480000]])[0]
    second = tokenizer.tokenize_batch([audio[480000:]])[0]
    assert len(first) == 375 and len(second) == 13
    assert tokens == first + second
    # positions restart at 0: the second window's tokens do not depend on the first window's audio
    other = np.concatenate([speech(8, 30.0), audio[480000:]])
    assert tokenizer.tokenize_batch([other])[0][375:] == second


def test_deterministic(tokenizer: SpeechTokenizer, dev_dir, tmp_path) -> None:
    audio = speech(9, 6.0)
    assert tokenizer.tokenize_batch([audio]) == tokenizer.tokenize_batch([audio])
    again = write_dev_checkpoint(tmp_path / "again", seed=0)
    other = write_dev_checkpoint(tmp_path / "other", seed=1)
    assert SpeechTokenizer.from_dir(again).info.fingerprint == tokenizer.info.fingerprint
    assert SpeechTokenizer.from_dir(again).tokenize_batch([audio]) == tokenizer.tokenize_batch([audio])
    other_tok = SpeechTokenizer.from_dir(other)
    assert other_tok.info.fingerprint != tokenizer.info.fingerprint
    assert other_tok.tokenize_batch([audio]) != tokenizer.tokenize_batch([audio])


def test_block_causal(tokenizer: SpeechTokenizer, dev_dir, tmp_path) -> None:
    """Appending audio after a completed 4 s block leaves that block's 50 tokens unchanged
    (as long as the appended audio is quieter, i.e. the log-mel floor is unchanged)."""
    head = speech(10, 4.1)  # block 0 = first 64000 samples, plus 200 samples of STFT lookahead
    tail = 0.3 * speech(11, 8.0, loud_start=False)
    both = np.concatenate([head, tail])
    assert tokenizer.block_tokens == 50
    assert tokenizer.tokenize_batch([head])[0][:50] == tokenizer.tokenize_batch([both])[0][:50]
    # the same weights with full attention (no block size) do let later audio change block 0
    target = tmp_path / "full"
    shutil.copytree(dev_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["quantize_causal_block_size"] = None
    (target / "config.json").write_text(json.dumps(config))
    full = SpeechTokenizer.from_dir(target)
    assert full.block_tokens is None
    assert full.tokenize_batch([head])[0][:50] != full.tokenize_batch([both])[0][:50]


def test_silence_gives_tokens(tokenizer: SpeechTokenizer) -> None:
    assert len(tokenizer.tokenize(np.zeros(8000, dtype=np.float32), 8000)) == 13


def test_resampling_keeps_duration(tokenizer: SpeechTokenizer) -> None:
    audio48 = np.sin(np.arange(48000 * 2) / 48000 * 2 * np.pi * 300).astype(np.float32) * 0.3
    assert len(tokenizer.tokenize(audio48, 48000)) == 25


def test_first_channel_only(tokenizer: SpeechTokenizer) -> None:
    left = speech(12, 2.0)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    assert tokenizer.tokenize(stereo) == tokenizer.tokenize(left)


def test_nearest_code_first_index_wins_ties() -> None:
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.9]]])
    assert nearest_code(x, codebook).tolist() == [[0, 1, 0, 1]]
