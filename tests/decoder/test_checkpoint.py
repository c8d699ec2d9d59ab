"""Checkpoint directory loading (strict) and dev checkpoint writing (published layout, seeded)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from glmv_common.errors import CheckpointError
from glmv_decoder.checkpoint import load_decoder
from glmv_decoder.config import load_config
from glmv_decoder.devmodel import dev_config, write_dev_checkpoint
from glmv_decoder.flow import FlowModel


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory) -> Path:
    return write_dev_checkpoint(tmp_path_factory.mktemp("dec") / "model", seed=0, codebook_size=64)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_dev_checkpoint_layout(dev_dir: Path) -> None:
    assert sorted(p.name for p in dev_dir.iterdir()) == ["config.yaml", "flow.pt", "hift.pt"]
    text = (dev_dir / "config.yaml").read_text()
    assert "flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec" in text
    assert "hift: !new:cosyvoice.hifigan.generator.HiFTGenerator" in text
    assert load_config(dev_dir / "config.yaml") == dev_config("dev", 64)
    flow_sd = torch.load(dev_dir / "flow.pt", weights_only=True)
    hift_sd = torch.load(dev_dir / "hift.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in [*flow_sd.values(), *hift_sd.values()])
    assert flow_sd["input_embedding.weight"].shape == (64, 64)
    # Published naming: legacy weight-norm keys in hift.pt.
    assert "conv_pre.weight_g" in hift_sd and "conv_pre.weight_v" in hift_sd
    assert "encoder.encoders.1.self_attn.pos_bias_u" in flow_sd


def test_round_trip_loads_the_written_tensors(dev_dir: Path) -> None:
    dec = load_decoder(dev_dir)
    saved = torch.load(dev_dir / "flow.pt", weights_only=True)
    loaded = dec.flow.state_dict()
    assert list(loaded) == list(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert dec.hift is not None and not dec.flow.training
    saved_h = torch.load(dev_dir / "hift.pt", weights_only=True)
    assert all(torch.equal(dec.hift.state_dict()[k], v) for k, v in saved_h.items())
    assert dec.model_id == "model" and len(dec.fingerprint) == 16
    assert dec.config.flow.vocab_size == 64


def test_seeded_and_deterministic(tmp_path: Path, dev_dir: Path) -> None:
    again = write_dev_checkpoint(tmp_path / "again", seed=0, codebook_size=64)
    other = write_dev_checkpoint(tmp_path / "other", seed=1, codebook_size=64)
    a = torch.load(dev_dir / "flow.pt", weights_only=True)
    b = torch.load(again / "flow.pt", weights_only=True)
    c = torch.load(other / "flow.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_embedding.weight"], c["input_embedding.weight"])
    assert load_decoder(again).fingerprint == load_decoder(dev_dir).fingerprint
    assert load_decoder(other).fingerprint != load_decoder(dev_dir).fingerprint


def test_missing_directory_and_files(tmp_path: Path, dev_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as exc:
        load_decoder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(exc.value)
    for name in ("config.yaml", "flow.pt", "hift.pt"):
        d = copy_dir(dev_dir, tmp_path / f"no-{name}")
        (d / name).unlink()
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_decoder(d)


def test_strict_loading_reports_missing_and_unexpected_keys(tmp_path: Path, dev_dir: Path) -> None:
    d = copy_dir(dev_dir, tmp_path / "bad")
    sd = torch.load(d / "flow.pt", weights_only=True)
    del sd["encoder.after_norm.bias"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    torch.save(sd, d / "flow.pt")
    with pytest.raises(CheckpointError) as exc:
        load_decoder(d)
    msg = str(exc.value)
    assert "flow.pt" in msg
    assert "missing keys (1): encoder.after_norm.bias" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg


def test_shape_mismatch_is_reported(tmp_path: Path, dev_dir: Path) -> None:
    d = copy_dir(dev_dir, tmp_path / "shape")
    sd = torch.load(d / "hift.pt", weights_only=True)
    sd["m_source.l_linear.weight"] = torch.zeros(1, 7)
    torch.save(sd, d / "hift.pt")
    with pytest.raises(CheckpointError, match=r"hift\.pt.*m_source\.l_linear\.weight \(1, 7\) != \(1, 9\)"):
        load_decoder(d)


def test_config_and_weights_must_agree(tmp_path: Path, dev_dir: Path) -> None:
    d = copy_dir(dev_dir, tmp_path / "vocab")
    text = (d / "config.yaml").read_text().replace("vocab_size: 64", "vocab_size: 65")
    (d / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=r"input_embedding\.weight \(64, 64\) != \(65, 64\)"):
        load_decoder(d)


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", ["not a dict", "evil", "garbage"])
def test_unreadable_or_unsafe_weights(tmp_path: Path, dev_dir: Path, payload: str, capsys) -> None:
    d = copy_dir(dev_dir, tmp_path / payload.replace(" ", "_"))
    if payload == "not a dict":
        torch.save([torch.zeros(1)], d / "flow.pt")
    elif payload == "evil":
        with open(d / "flow.pt", "wb") as fh:
            pickle.dump({"x": Evil()}, fh)
    else:
        (d / "flow.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"flow\.pt"):
        load_decoder(d)
    assert "executed" not in capsys.readouterr().out


def test_dtype_and_bad_options(dev_dir: Path) -> None:
    dec = load_decoder(dev_dir, dtype="bfloat16", load_hift=False)
    assert dec.hift is None and dec.flow.input_embedding.weight.dtype == torch.bfloat16
    tok = torch.randint(0, 64, (1, 12))
    args = (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80), torch.zeros(1, 192))
    mel = dec.flow.inference(tok, *args, torch.Generator().manual_seed(42))
    assert mel.dtype == torch.float32 and torch.isfinite(mel).all()
    with pytest.raises(CheckpointError, match="dtype"):
        load_decoder(dev_dir, dtype="int8")


def test_batched_guidance_matches_closely(dev_dir: Path) -> None:
    exact = load_decoder(dev_dir, load_hift=False)
    batched = load_decoder(dev_dir, load_hift=False, batch_guidance=True)
    tok = torch.randint(0, 64, (1, 25), generator=torch.Generator().manual_seed(3))
    args = (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80), torch.zeros(1, 192))
    a = exact.flow.inference(tok, *args, torch.Generator().manual_seed(42))
    b = batched.flow.inference(tok, *args, torch.Generator().manual_seed(42))
    assert torch.allclose(a, b, atol=1e-4)


def test_realsize_config_builds_published_flow_on_meta() -> None:
    cfg = dev_config("realsize")
    assert cfg.flow.vocab_size == 16384
    with torch.device("meta"):
        model = FlowModel(cfg.flow)
    assert sum(p.numel() for p in model.parameters()) == 111_166_208
