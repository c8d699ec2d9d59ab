"""Decoder config parsing: published structure, !ref resolution, and that nothing named in it is executed."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from glmv_common.errors import CheckpointError
from glmv_decoder.config import Call, DecoderConfig, load_config, load_tagged_yaml, parse_config
from glmv_decoder.devmodel import dev_config, render_config_yaml


def published_text() -> str:
    """The published layout rendered from the default (= published) hyperparameters."""
    return render_config_yaml(DecoderConfig())


def test_published_layout_round_trips_to_published_values() -> None:
    text = published_text()
    for tag in (
        "!apply:torch.manual_seed [1986]",
        "!new:cosyvoice.flow.flow.MaskedDiffWithXvec",
        "!new:cosyvoice.transformer.encoder.BlockConformerEncoder",
        "!new:omegaconf.DictConfig",
        "!new:cosyvoice.hifigan.generator.HiFTGenerator",
        "sampling_rate: !ref <sample_rate>",
        "spk_embed_dim: !ref <spk_embed_dim>",
        "sigma_min: 1e-06",
    ):
        assert tag in text
    cfg = parse_config(text)
    assert cfg == DecoderConfig()
    flow = cfg.flow
    assert (flow.vocab_size, flow.input_frame_rate, flow.encoder.block_size) == (16384, 12.5, 10)
    assert flow.decoder.inference_cfg_rate == 0.7 and flow.decoder.t_scheduler == "cosine"
    assert flow.decoder.sigma_min == pytest.approx(1e-6)
    assert flow.estimator.channels == (256, 256) and flow.estimator.num_mid_blocks == 12
    assert cfg.hift.sampling_rate == 22050 and cfg.hift.f0_predictor.cond_channels == 512


def test_dev_config_round_trips() -> None:
    cfg = dev_config("dev", 37)
    assert parse_config(render_config_yaml(cfg, (32, 32, 64, 2))) == cfg
    assert cfg.flow.vocab_size == 37


def test_tags_are_recorded_not_executed(tmp_path) -> None:
    marker = tmp_path / "pwned"
    text = published_text().replace(
        "__set_seed1: !apply:random.seed [1986]",
        f'__set_seed1: !apply:random.seed [1986]\n__evil: !apply:os.system ["touch {marker}"]\n'
        f'__evil2: !new:subprocess.Popen ["touch {marker}"]',
    )
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    before = set(sys.modules)
    doc = load_tagged_yaml(text)
    cfg = parse_config(text)
    assert not marker.exists()
    assert cfg == DecoderConfig()
    assert doc["__evil"] == Call("apply", "os.system", (f"touch {marker}",), {})
    assert doc["llm"].target == "cosyvoice.llm.llm.TransformerLM"  # recorded, never constructed
    # No seeding side effect, nothing imported.
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    roots = {"cosyvoice", "omegaconf", "subprocess", "hyperpyyaml"}
    new = {m for m in set(sys.modules) - before if m.split(".")[0] in roots}
    assert not new


def test_flow_section_naming_a_foreign_class_is_rejected(tmp_path) -> None:
    marker = tmp_path / "pwned"
    text = published_text().replace(
        "flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec", "flow: !new:os.system"
    )
    with pytest.raises(CheckpointError, match=r"os\.system"):
        parse_config(text)
    evil = f'flow: !apply:os.system ["touch {marker}"]\nhift: !apply:os.system ["touch {marker}"]\n'
    with pytest.raises(CheckpointError, match="`flow` must be a `!new:` object"):
        parse_config(evil)
    assert not marker.exists()


def test_refs_are_resolved() -> None:
    doc = load_tagged_yaml("a: 3\nb: !ref <a>\nc: !new:x.Y\n    k: !ref <b>\nd: !ref <c[k]>\n")
    assert doc["b"] == 3 and doc["c"].kwargs == {"k": 3} and doc["d"] == 3
    with pytest.raises(CheckpointError, match="unknown key"):
        load_tagged_yaml("b: !ref <nope>\n")
    with pytest.raises(CheckpointError, match="unsupported !ref"):
        load_tagged_yaml("a: 1\nb: !ref <a> * 2\n")
    with pytest.raises(CheckpointError, match="cycle"):
        load_tagged_yaml("a: !ref <b>\nb: !ref <a>\n")


def test_ref_changes_propagate() -> None:
    cfg = parse_config(published_text().replace("sample_rate: 22050", "sample_rate: 24000"))
    assert cfg.sample_rate == 24000 and cfg.hift.sampling_rate == 24000


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("use_cnn_module: False", "use_cnn_module: True", "use_cnn_module"),
        (
            "selfattention_layer_type: 'block_rel_selfattn'",
            "selfattention_layer_type: 'rel_selfattn'",
            "selfattention_layer_type",
        ),
        ("        block_size: 10", "        block_size: 10\n        bogus: 1", "bogus"),
        ("solver: 'euler'", "solver: 'midpoint'", "solver"),
        ("vocab_size: 16384", "vocab_size: 'many'", "vocab_size"),
        ("input_size: 512\n    output_size: 80", "input_size: 256\n    output_size: 80", "input_size"),
    ],
)
def test_unsupported_or_inconsistent_values_are_reported(old: str, new: str, match: str) -> None:
    text = published_text()
    assert old in text
    head, _, tail = text.rpartition(old)  # the last occurrence: the flow section, not the unused llm
    with pytest.raises(CheckpointError, match=match):
        parse_config(head + new + tail)


@pytest.mark.parametrize(
    "text",
    ["a: !include other.yaml\nflow: 1\n", "- 1\n- 2\n", "flow: [\n", "hift: 1\n"],
)
def test_malformed_configs_raise_checkpoint_error(text: str) -> None:
    with pytest.raises(CheckpointError):
        parse_config(text)


def test_load_config_missing_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_config(tmp_path / "config.yaml")
