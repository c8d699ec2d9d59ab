"""``glmv-decoder`` CLI: make-dev, synthesize (one-shot and streamed), errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from glmv_decoder.checkpoint import load_decoder
from glmv_decoder.cli import main
from glmv_decoder.streaming import feat_len, one_shot


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "dev"
    assert main(["make-dev", "--out", str(out), "--seed", "3", "--codebook-size", "32"]) == 0
    return out


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    rng = random.Random(0)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([rng.randrange(32) for _ in range(40)]))
    return path


def test_make_dev_layout(model: Path) -> None:
    assert sorted(p.name for p in model.iterdir()) == ["config.yaml", "flow.pt", "hift.pt"]
    assert load_decoder(model).config.flow.vocab_size == 32


def test_synthesize_one_shot_npy_matches_library(
    model: Path, token_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "a.npy"
    assert main(["synthesize", "--model", str(model), "--tokens", str(token_file), "--out", str(out)]) == 0
    audio = np.load(out)
    assert audio.dtype == np.float32 and audio.shape == (256 * feat_len(40),)
    expected = one_shot(load_decoder(model), json.loads(token_file.read_text()))
    assert np.array_equal(audio, expected)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == len(audio)


def test_synthesize_streamed_wav_resampled(model: Path, token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.wav"
    rc = main(
        [
            "synthesize",
            "--model",
            str(model),
            "--tokens",
            str(token_file),
            "--out",
            str(out),
            "--schedule",
            "10,25",
            "--sample-rate",
            "16000",
        ]
    )
    assert rc == 0
    data, rate = sf.read(out, dtype="float32")
    assert rate == 16000
    assert abs(len(data) - 256 * feat_len(40) * 16000 / 22050) <= 2
    npy = tmp_path / "b.npy"
    assert (
        main(
            [
                "synthesize",
                "--model",
                str(model),
                "--tokens",
                str(token_file),
                "--out",
                str(npy),
                "--schedule",
                "10,25",
            ]
        )
        == 0
    )
    assert np.load(npy).shape == (256 * feat_len(40),)  # streamed length == one-shot length


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("[1, 2, 99]", [], "outside the codebook"),
        ('{"a": 1}', [], "JSON array"),
        ("[]", [], "no speech tokens"),
        ("[1, 2, 3]", ["--schedule", "0,5"], "--schedule"),
    ],
)
def test_synthesize_errors(
    model: Path, tmp_path: Path, capsys, content: str, extra: list[str], message: str
) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    rc = main(
        ["synthesize", "--model", str(model), "--tokens", str(path), "--out", str(tmp_path / "x.npy"), *extra]
    )
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_model_dir(tmp_path: Path, token_file: Path, capsys) -> None:
    rc = main(
        [
            "synthesize",
            "--model",
            str(tmp_path / "absent"),
            "--tokens",
            str(token_file),
            "--out",
            str(tmp_path / "x.wav"),
        ]
    )
    assert rc == 2
    assert "absent" in capsys.readouterr().err


def test_console_script_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "glmv_decoder.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    for word in ("make-dev", "synthesize", "serve"):
        assert word in proc.stdout
