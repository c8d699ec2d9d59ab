"""glmv-lm CLI: make-dev, generate (raw ids and structured prompt), score, info."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from glmv_lm.checkpoint import load_model
from glmv_lm.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def weights_only(tmp_path_factory: pytest.TempPathFactory, dev_dir: Path) -> Path:
    """The dev model without tokenizer files (raw-id commands must not need them)."""
    d = tmp_path_factory.mktemp("weights-only")
    for p in dev_dir.iterdir():
        if not p.name.startswith("tokenizer"):
            shutil.copy(p, d / p.name)
    return d


def test_generate_raw_ids_greedy_matches_manual_argmax(
    capsys: pytest.CaptureFixture[str], weights_only: Path
) -> None:
    out = run(
        capsys,
        "generate",
        "--model",
        str(weights_only),
        "--ids",
        "1,2,3",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    )
    assert len(out["ids"]) <= 8 and out["ids"]
    model = load_model(weights_only).model
    seq = [1, 2, 3]
    with torch.inference_mode():
        for _ in range(len(out["ids"])):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[3:] == out["ids"]


def test_generate_sampling_is_reproducible_with_seed(
    capsys: pytest.CaptureFixture[str], weights_only: Path
) -> None:
    args = [
        "generate",
        "--model",
        str(weights_only),
        "--ids",
        "5,6",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "7",
    ]
    assert run(capsys, *args)["ids"] == run(capsys, *args)["ids"]


def test_generate_from_prompt_json(capsys: pytest.CaptureFixture[str], dev_dir: Path, tmp_path: Path) -> None:
    conv = {"mode": "audio", "turns": [{"role": "user", "audio": [1, 2, 3]}], "style": {"emotion": "happy"}}
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conv))
    out = run(
        capsys, "generate", "--model", str(dev_dir), "--prompt-json", str(path), "--max-new-tokens", "5"
    )
    assert out["prompt_ids"][:2] == [432, 434] and out["dropped_turns"] == 0
    assert len(out["ids"]) <= 5 and isinstance(out["text"], str) and isinstance(out["audio_tokens"], list)


def test_score_writes_fp32_logits(
    capsys: pytest.CaptureFixture[str], weights_only: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "logits.npy"
    out = run(capsys, "score", "--model", str(weights_only), "--ids", "4,5,6,7", "--out", str(dest))
    arr = np.load(dest)
    assert out["shape"] == [4, 576] and arr.shape == (4, 576) and arr.dtype == np.float32
    with torch.inference_mode():
        ref = load_model(weights_only).model(input_ids=torch.tensor([[4, 5, 6, 7]])).logits[0].numpy()
    assert np.abs(arr - ref).max() < 1e-5


def test_make_dev_and_info(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run(capsys, "make-dev", "--out", str(tmp_path / "d"), "--seed", "3", "--codebook-size", "32")
    info = run(capsys, "info", "--model", str(tmp_path / "d"))
    assert info["layout"] == "chatglm" and info["tokenizer"]["audio_count"] == 32


def test_bad_model_dir_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["score", "--model", str(tmp_path), "--ids", "1", "--out", str(tmp_path / "x.npy")]) == 2
    assert str(tmp_path / "config.json") in capsys.readouterr().err
