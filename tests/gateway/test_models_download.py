"""``glmv models download`` against a local server with the hub's file layout (never the internet)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from glmv_gateway.checkpoints import LAYOUTS, check_layout
from glmv_gateway.cli import main
from glmv_gateway.stack import make_dev_models

from .hub_server import HubServer

# Files the published repositories carry that no service reads.
EXTRAS = {
    "tokenizer": {"README.md": b"# tokenizer\n", ".gitattributes": b"*.safetensors filter=lfs\n"},
    "lm": {
        "README.md": b"# lm\n",
        "modeling_chatglm.py": b"# remote code the LM service never runs\n",
        "pytorch_model.bin": b"\0" * 4096,
    },
    "decoder": {"README.md": b"# decoder\n", "campplus.onnx": b"\0" * 2048},
}


@pytest.fixture(scope="module")
def dev_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_models(tmp_path_factory.mktemp("dev-models"), seed=3)


@pytest.fixture
def hub(tmp_path: Path, dev_models: dict[str, Path]):
    root = tmp_path / "hub"
    for component, src in dev_models.items():
        repo = root / LAYOUTS[component].repo_id
        shutil.copytree(src, repo)
        for name, data in EXTRAS[component].items():
            (repo / name).write_bytes(data)
    with HubServer(root) as server:
        yield server


def download(out: Path, hub: HubServer, *extra: str) -> int:
    return main(["models", "download", "--out", str(out), "--endpoint", hub.url, "--quiet", *extra])


def local_files(path: Path) -> set[str]:
    return {
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts
    }


def test_dev_checkpoints_pass_the_layout_check(dev_models: dict[str, Path]) -> None:
    for component, path in dev_models.items():
        assert check_layout(component, path) == []


def test_download_fetches_only_what_each_service_reads(
    tmp_path: Path, hub: HubServer, dev_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models"
    assert download(out, hub) == 0
    for component, src in dev_models.items():
        got = out / component
        assert local_files(got) == local_files(src), component
        for name in local_files(src):
            assert (got / name).read_bytes() == (src / name).read_bytes(), name
        for extra in EXTRAS[component]:
            assert not hub.state.gets(extra), f"{extra} was fetched"
    printed = capsys.readouterr().out
    assert f"GLMV_LM_MODEL_DIR={(out / 'lm').resolve()}" in printed
    assert f"GLMV_DECODER_MODEL_DIR={(out / 'decoder').resolve()}" in printed
    assert f"GLMV_MODELS_DIR={out.resolve()}" in printed
    assert hub.state.commit in printed


def test_endpoint_from_the_environment_and_one_component(
    tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLMV_MODELS_ENDPOINT", hub.url)
    out = tmp_path / "models"
    assert main(["models", "download", "--out", str(out), "--quiet", "decoder"]) == 0
    assert local_files(out / "decoder") == {"config.yaml", "flow.pt", "hift.pt"}
    assert not (out / "lm").exists()
    assert all("glm-4-voice-decoder" in r.path for r in hub.state.requests)


def test_a_broken_transfer_resumes_from_where_it_stopped(tmp_path: Path, hub: HubServer) -> None:
    # The hub client writes in 10 MiB chunks: a transfer that breaks after 11 MiB resumes past zero.
    weights = hub.state.root / LAYOUTS["tokenizer"].repo_id / "model.safetensors"
    data = random.Random(7).randbytes(24 * 2**20)
    weights.write_bytes(data)
    hub.state.break_once["model.safetensors"] = (11 * 2**20, 1)
    out = tmp_path / "models"
    assert download(out, hub, "tokenizer") == 0
    ranges = [r.range for r in hub.state.gets("model.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 11 * 2**20
    assert (out / "tokenizer" / "model.safetensors").read_bytes() == data


def test_an_interrupted_download_keeps_finished_files_and_fetches_only_the_rest(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.state.break_at["flow.pt"] = 1000
    out = tmp_path / "models"
    assert download(out, hub) == 1
    err = capsys.readouterr().err
    assert "decoder" in err and "THUDM/glm-4-voice-decoder" in err
    assert check_layout("tokenizer", out / "tokenizer") == []
    assert not (out / "decoder" / "flow.pt").exists()
    fetched_before = len(hub.state.gets("model.safetensors"))
    del hub.state.break_at["flow.pt"]
    assert download(out, hub) == 0
    assert len(hub.state.gets("model.safetensors")) == fetched_before  # not fetched again
    assert check_layout("decoder", out / "decoder") == []


def test_a_repository_that_is_not_a_checkpoint_is_refused(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = hub.state.root / LAYOUTS["lm"].repo_id
    index = json.loads((repo / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (repo / shard).unlink()
    assert download(tmp_path / "models", hub, "lm") == 1
    err = capsys.readouterr().err
    assert f"shard {shard}" in err and "not a usable lm checkpoint" in err


def test_an_unknown_repository_is_a_clear_error(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert download(tmp_path / "models", hub, "--lm-repo", "nobody/nothing", "lm") == 1
    assert "nobody/nothing" in capsys.readouterr().err
    assert main(["models", "download", "--out", str(tmp_path), "vocoder"]) == 2
