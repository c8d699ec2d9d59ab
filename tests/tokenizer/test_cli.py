"""The glmv-tokenizer CLI: make-dev and offline tokenize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from glmv_tokenizer.cli import main
from glmv_tokenizer.tokenizer import SpeechTokenizer, prepare_audio

from .conftest import speech


def test_make_dev_and_tokenize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    assert main(["make-dev", "--out", str(model), "--seed", "0", "--codebook-size", "32"]) == 0
    assert json.loads((model / "config.json").read_text())["quantize_vocab_size"] == 32
    capsys.readouterr()
    mono = tmp_path / "a.wav"
    stereo = tmp_path / "b.flac"
    audio = speech(40, 2.0)
    sf.write(mono, audio, 16000, subtype="FLOAT")
    sf.write(stereo, np.stack([audio[:24000], np.zeros(24000, dtype=np.float32)], 1), 24000)
    assert main(["tokenize", "--model", str(model), str(mono), str(stereo)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = SpeechTokenizer.from_dir(model)
    assert lines[0] == {"path": str(mono), "tokens": tok.tokenize(audio)}
    assert lines[1]["path"] == str(stereo)
    assert lines[1]["tokens"] == tok.tokenize_batch([prepare_audio(audio[:24000], 24000)])[0]
    assert len(lines[1]["tokens"]) == 13


def test_tokenize_reports_bad_files(
    dev_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF garbage")
    assert main(["tokenize", "--model", str(dev_dir), str(bad), str(tmp_path / "missing.wav")]) == 1
    err = capsys.readouterr().err
    assert "bad.wav" in err and "missing.wav" in err


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--model", str(tmp_path / "none"), "x.wav"]) == 2
    assert "not found" in capsys.readouterr().err
