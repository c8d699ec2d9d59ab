"""The versions registry file and LM replica hashing, without processes (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmv_gateway.versions import VersionRegistry, load_registry_file

ADDRS = {"tokenizer": "127.0.0.1:1", "lm": "127.0.0.1:2", "decoder": "127.0.0.1:3"}


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "versions file"),
        ({"decoder": []}, "at least one version"),
        ({"decoder": [{"id": "v1", "addresses": ["a:1"]}, {"id": "v1", "addresses": ["b:1"]}]}, "duplicate"),
        ({"decoder": [{"id": "v1", "addresses": []}]}, "addresses"),
        ({"decoder": [{"id": "v1", "addresses": ["a:1"], "weight": -1}]}, "weight"),
        ({"lm": [{"id": "v1", "addresses": ["a:1"]}]}, "lm"),
    ],
)
def test_bad_files_are_refused_with_a_message(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_registry_file(write(tmp_path / "v.json", data))


def test_a_bad_file_keeps_the_last_good_registry(tmp_path: Path) -> None:
    path = write(tmp_path / "v.json", {"decoder": [{"id": "v1", "addresses": ["a:1"], "weight": 2}]})
    registry = VersionRegistry(ADDRS, versions_file=path)
    assert [(v.id, v.weight) for v in registry.versions["decoder"]] == [("v1", 2)]
    assert [v.endpoints[0].address for v in registry.versions["tokenizer"]] == ["127.0.0.1:1"]
    write(path, '{"decoder": [')
    assert registry.reload(force=True) is False
    assert "versions file" in (registry.file_error or "")
    assert [v.id for v in registry.versions["decoder"]] == ["v1"]
    write(path, {"decoder": [{"id": "v2", "addresses": ["b:1"], "draining": True}]})
    assert registry.reload(force=True) is True and registry.file_error is None
    assert [(v.id, v.draining) for v in registry.versions["decoder"]] == [("v2", True)]


def test_lm_replica_hashing_is_stable_and_moves_few_sessions() -> None:
    three = VersionRegistry(ADDRS, lm_addrs=["a:1", "b:1", "c:1"])
    four = VersionRegistry(ADDRS, lm_addrs=["a:1", "b:1", "c:1", "d:1"])
    sessions = [f"s{i}" for i in range(3000)]
    first = {s: three.lm_address(s) for s in sessions}
    assert first == {s: three.lm_address(s) for s in sessions}  # same session, same replica
    counts = {a: list(first.values()).count(a) for a in ("a:1", "b:1", "c:1")}
    assert all(800 < n < 1200 for n in counts.values()), counts
    moved = [s for s in sessions if four.lm_address(s) != first[s]]
    assert all(four.lm_address(s) == "d:1" for s in moved)  # only to the new replica
    assert 550 < len(moved) < 950  # about a quarter
    # a replica known down: its sessions go to their next choice, the others stay
    three.lm[0].health = "unreachable (UNAVAILABLE)"
    for s in sessions:
        if first[s] != "a:1":
            assert three.lm_address(s) == first[s]
        else:
            assert three.lm_address(s) == three.lm_ranking(s)[1].address
