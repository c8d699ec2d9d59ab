"""Loading the published layouts, and clear errors for missing or mismatched files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glmv_common.errors import CheckpointError
from glmv_tokenizer.checkpoint import load_checkpoint, write_dev_checkpoint
from glmv_tokenizer.tokenizer import SpeechTokenizer

from .conftest import speech


def test_dev_checkpoint_has_published_layout(dev_dir: Path) -> None:
    assert sorted(p.name for p in dev_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    config = json.loads((dev_dir / "config.json").read_text())
    assert config["model_type"] == "whisper" and config["quantize_vocab_size"] == 64
    assert config["architectures"] == ["WhisperVQEncoder"]
    with safe_open(str(dev_dir / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert {"conv1.weight", "embed_positions.weight", "codebook.weight", "embed_positions2.weight"} <= keys
    assert {"ema_count", "ema_weight", "layers.1.self_attn.q_proj.bias"} <= keys
    assert "layers.1.self_attn.k_proj.bias" not in keys and "layers.2.fc1.weight" not in keys
    pre = json.loads((dev_dir / "preprocessor_config.json").read_text())
    assert pre["feature_size"] == 128 and pre["sampling_rate"] == 16000


def test_training_layout_loads_to_the_same_model(dev_dir: Path, tmp_path: Path) -> None:
    training = write_dev_checkpoint(tmp_path / "training", seed=0, layout="training")
    with safe_open(str(training / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert "model.encoder.layer_norm.weight" in keys and "model.encoder.layers.3.fc1.weight" in keys
    assert "proj_out.weight" in keys and "conv1.weight" not in keys
    loaded = load_checkpoint(training)
    assert loaded.layout == "training" and len(loaded.model.layers) == 2
    audio = speech(20, 5.0)
    assert SpeechTokenizer(loaded).tokenize_batch([audio]) == SpeechTokenizer.from_dir(
        dev_dir
    ).tokenize_batch([audio])


def test_bare_layout_without_ema_buffers_loads(dev_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "noema"
    shutil.copytree(dev_dir, target)
    state = load_file(str(target / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("ema_")}, str(target / "model.safetensors"))
    assert load_checkpoint(target).layout == "bare"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "preprocessor_config.json"])
def test_missing_file_names_path_and_file(dev_dir: Path, tmp_path: Path, name: str) -> None:
    target = tmp_path / "partial"
    shutil.copytree(dev_dir, target)
    (target / name).unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target)
    assert str(target / name) in str(err.value) and name in str(err.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="MODEL_DIR"):
        load_checkpoint(None)


def _edit_config(dev_dir: Path, tmp_path: Path, **changes: object) -> Path:
    target = tmp_path / "edited"
    shutil.copytree(dev_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_shape_mismatch_is_named(dev_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"codebook\.weight: shape"):
        load_checkpoint(_edit_config(dev_dir, tmp_path, quantize_vocab_size=128))


def test_missing_layer_is_named(dev_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing keys.*layers\.2"):
        load_checkpoint(_edit_config(dev_dir, tmp_path, quantize_position=3, pooling_position=3))


def test_wrong_model_type(dev_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model_type"):
        load_checkpoint(_edit_config(dev_dir, tmp_path, model_type="chatglm"))


def test_feature_size_mismatch(dev_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "pre"
    shutil.copytree(dev_dir, target)
    pre = json.loads((target / "preprocessor_config.json").read_text())
    pre["feature_size"] = 80
    (target / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match="feature_size"):
        load_checkpoint(target)


def test_corrupt_weights(dev_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "corrupt"
    shutil.copytree(dev_dir, target)
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(target)


def test_half_precision_needs_cuda(dev_dir: Path) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        load_checkpoint(dev_dir, device="cpu", dtype="bfloat16")


def test_fingerprint_covers_weights(dev_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "changed"
    shutil.copytree(dev_dir, target)
    state = load_file(str(target / "model.safetensors"))
    state["conv1.bias"] = state["conv1.bias"] + 1
    save_file(state, str(target / "model.safetensors"))
    assert load_checkpoint(target).fingerprint != load_checkpoint(dev_dir).fingerprint
