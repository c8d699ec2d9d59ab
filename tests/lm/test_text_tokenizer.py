"""Text tokenizer: ids from the files, encode/decode round trips, incremental UTF-8-safe decoding."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmv_common.errors import CheckpointError
from glmv_lm.text_tokenizer import GlmTextTokenizer


def test_special_ids_come_from_the_files(tok: GlmTextTokenizer, dev_dir: Path) -> None:
    cfg = json.loads((dev_dir / "tokenizer_config.json").read_text())
    by_name = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    assert tok.token_id("<|user|>") == by_name["<|user|>"] == tok.end_token_id
    assert tok.audio_offset == by_name["<|audio_0|>"]
    assert tok.audio_count == 64
    assert tok.audio_id(63) == by_name["<|audio_63|>"]
    assert tok.prefix_ids == [by_name["[gMASK]"], by_name["<sop>"]]
    assert tok.eos_token_id == by_name["<|endoftext|>"]
    assert tok.is_audio(tok.audio_offset) and not tok.is_audio(tok.audio_offset + 64)
    with pytest.raises(KeyError, match="no added token"):
        tok.token_id("<|nope|>")
    with pytest.raises(ValueError):
        tok.audio_id(64)


def test_ids_are_not_hard_coded(tmp_path: Path, dev_dir: Path) -> None:
    """Moving the audio tokens in tokenizer_config.json moves the ids the tokenizer reports."""
    shutil.copy(dev_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    cfg = json.loads((dev_dir / "tokenizer_config.json").read_text())
    shifted = {}
    for k, v in cfg["added_tokens_decoder"].items():
        shifted[str(int(k) + 1000) if v["content"].startswith("<|audio_") else k] = v
    cfg["added_tokens_decoder"] = shifted
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    moved = GlmTextTokenizer.from_dir(tmp_path)
    base = GlmTextTokenizer.from_dir(dev_dir)
    assert moved.audio_offset == base.audio_offset + 1000
    assert moved.encode("<|audio_5|>") == [base.audio_offset + 1005]


def test_encode_splits_added_tokens_and_prefix(tok: GlmTextTokenizer) -> None:
    user, asst = tok.token_id("<|user|>"), tok.token_id("<|assistant|>")
    ids = tok.encode("<|user|>\nhi<|assistant|>", add_prefix=True)
    assert ids[:2] == tok.prefix_ids
    assert ids[2] == user and ids[-1] == asst
    assert ids[3:-1] == tok.encode("\nhi")
    # Without special parsing the tag is plain text.
    plain = tok.encode("<|user|>", parse_special=False)
    assert user not in plain and tok.decode(plain) == "<|user|>"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_any_text(text: str) -> None:
    tok = _TOK
    assert tok.decode(tok.encode(text, parse_special=False)) == text


def test_split_utf8_character_is_emitted_once_complete(tok: GlmTextTokenizer) -> None:
    ids = tok.encode("😀", parse_special=False)
    assert len(ids) > 1, "the dev BPE keeps this emoji as several byte tokens"
    dec = tok.incremental_decoder()
    pieces = [dec.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀"
    assert dec.flush() == ""


def test_incomplete_bytes_before_special_and_at_flush(tok: GlmTextTokenizer) -> None:
    ids = tok.encode("é", parse_special=False)
    first_byte = [i for i in ids if tok.token_bytes(i) == b"\xc3"]
    assert first_byte, "é is two single-byte tokens in the dev BPE"
    dec = tok.incremental_decoder()
    assert dec.push(first_byte[0]) == "" and dec.pending
    assert dec.push(tok.token_id("<|user|>")) == "\ufffd<|user|>"
    assert dec.push(first_byte[0]) == ""
    assert dec.flush() == "\ufffd"
    assert tok.decode([first_byte[0], tok.token_id("<|user|>")]) == "\ufffd<|user|>"


def test_decode_specials_audio_and_padding_rows(tok: GlmTextTokenizer) -> None:
    hi = tok.encode("Hi", parse_special=False)
    ids = [*hi, tok.audio_id(0), tok.audio_id(1), *hi, tok.eos_token_id]
    assert tok.decode(ids) == "Hi<|audio_0|><|audio_1|>Hi<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "HiHi"
    padding_row = tok.audio_offset + tok.audio_count + 3
    assert not tok.is_valid(padding_row)
    assert tok.decode([*hi, padding_row]) == "Hi"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=600), max_size=40))
def test_incremental_equals_one_shot(ids: list[int]) -> None:
    tok = _TOK
    dec = tok.incremental_decoder()
    streamed = "".join(dec.push(i) for i in ids) + dec.flush()
    assert streamed == tok.decode(ids)


def test_missing_files_name_the_path(tmp_path: Path, dev_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "tokenizer.model"))):
        GlmTextTokenizer.from_dir(tmp_path)
    shutil.copy(dev_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match=re.escape("tokenizer_config.json")):
        GlmTextTokenizer.from_dir(tmp_path)
    cfg = json.loads((dev_dir / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        k: v for k, v in cfg["added_tokens_decoder"].items() if v["content"] != "<|begin_of_audio|>"
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="begin_of_audio"):
        GlmTextTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_text("not-base64!! x\n")
    with pytest.raises(CheckpointError, match=re.escape("tokenizer.model:1")):
        GlmTextTokenizer.from_dir(tmp_path)


# hypothesis tests cannot take function-scoped fixtures; build one tokenizer at import.
def _module_tokenizer() -> GlmTextTokenizer:
    import tempfile

    from glmv_lm.devmodel import write_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="glmv-lm-tok-"))
    try:
        write_tokenizer(tmp, merges=256, codebook_size=64)
        return GlmTextTokenizer.from_dir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_TOK = _module_tokenizer()
