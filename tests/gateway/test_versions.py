"""Component versions side by side and session-affine LM routing, with real processes: two decoder
versions (dev checkpoints of different seeds), an incompatible third one, two LM replicas."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from glmv_gateway.client import GatewayClient
from glmv_gateway.stack import LocalStack, script

from ..conftest import REDIS_PORT
from .conftest import FAST, stack_db

pytestmark = pytest.mark.timeout(900)


def make_decoder(out: Path, seed: int, codebook_size: int | None = None) -> Path:
    if not (out / "flow.pt").exists():
        cmd = [script("glmv-decoder"), "make-dev", "--out", str(out), "--seed", str(seed)]
        if codebook_size is not None:
            cmd += ["--codebook-size", str(codebook_size)]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def metric(stack: LocalStack, name: str, process: str, labels: str = "") -> float:
    """Sum of a Prometheus sample (optionally only lines containing ``labels``) from one process."""
    text = httpx.get(stack.metrics_url(process), timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            head, value = line.rsplit(" ", 1)
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


@pytest.fixture(scope="module")
def vstack(dev_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("versions")
    root = tmp_path_factory.getbasetemp() / "models"
    v2_dir = make_decoder(root / "decoder-seed1", seed=1)
    v3_dir = make_decoder(root / "decoder-codebook32", seed=2, codebook_size=32)
    versions_file = tmp / "versions.json"
    stack = LocalStack(
        models=dev_models,
        redis_url=f"redis://127.0.0.1:{REDIS_PORT}/{stack_db('own')}",
        log_dir=tmp,
        extra_env={"OMP_NUM_THREADS": "1", "GLMV_DECODER_TORCH_THREADS": "1", "GLMV_LM_TORCH_THREADS": "1"},
        with_worker=False,
    )
    import redis

    redis.Redis.from_url(stack.redis_url).flushdb()
    try:
        # the second decoder version reports its id from its setting; the first one from its checkpoint
        v2 = stack.start_extra("decoder_v2", "decoder", v2_dir, {"GLMV_DECODER_MODEL_VERSION": "v2"})
        v3 = stack.start_extra("decoder_v3", "decoder", v3_dir)
        lm2 = stack.start_extra("lm2", "lm", dev_models["lm"])
        registry = {
            "decoder": [
                {"id": "v1", "addresses": [stack.addr("decoder")], "weight": 3},
                {"id": "v2", "addresses": [v2], "weight": 1},
                {"id": "v3", "addresses": [v3], "weight": 1},
            ]
        }
        versions_file.write_text(json.dumps(registry))
        stack.gateway_env = {
            "GLMV_GATEWAY_VERSIONS_FILE": str(versions_file),
            "GLMV_GATEWAY_VERSIONS_POLL_S": "0.5",
            "GLMV_GATEWAY_LM_ADDRESSES": f"{stack.addr('lm')},{lm2}",
        }
        stack.start(timeout=300)
        stack.versions_file = versions_file  # type: ignore[attr-defined]
        yield stack
    finally:
        stack.stop()


def models(stack: LocalStack) -> dict[str, Any]:
    r = httpx.get(f"{stack.gateway_url}/v1/models", headers={"Authorization": f"Bearer {stack.api_key}"})
    assert r.status_code == 200, r.text
    return r.json()["components"]


def decoder_states(stack: LocalStack) -> dict[str, str]:
    return {v["id"]: v["state"] for v in models(stack)["decoder"]}


@pytest.fixture(scope="module")
def ready(vstack: LocalStack) -> LocalStack:
    wait_for(
        lambda: decoder_states(vstack) == {"v1": "serving", "v2": "serving", "v3": "incompatible"},
        "v1, v2 serving and v3 refused",
        timeout=240,
    )
    return vstack


def test_models_lists_versions_with_share_and_fingerprints(ready: LocalStack) -> None:
    listing = models(ready)
    rows = {v["id"]: v for v in listing["decoder"]}
    assert rows["v1"]["traffic_share"] == pytest.approx(0.75)
    assert rows["v2"]["traffic_share"] == pytest.approx(0.25)
    assert rows["v3"]["traffic_share"] == 0
    # different seeds: different checkpoints; ModelInfo carries each version's id
    assert rows["v1"]["fingerprint"] != rows["v2"]["fingerprint"]
    assert rows["v2"]["model_version"] == "v2"
    assert rows["v1"]["model_version"] == rows["v1"]["fingerprint"][:12]
    # no file entry for the tokenizer: one version whose id the service reports
    (tok,) = listing["tokenizer"]
    assert tok["id"] == tok["fingerprint"][:12] and tok["traffic_share"] == 1
    assert {e["health"] for e in listing["lm"]} == {"SERVING"} and len(listing["lm"]) == 2


def test_incompatible_version_is_refused_with_a_message(ready: LocalStack) -> None:
    (v3,) = [v for v in models(ready)["decoder"] if v["id"] == "v3"]
    (problem,) = v3["problems"]
    assert "decoder v3" in problem and "32 speech codes" in problem
    assert "the lm" in problem and "64 audio tokens" in problem
    ready_body = httpx.get(f"{ready.gateway_url}/readyz").json()
    assert ready_body["status"] == "ready"  # v1 and v2 still serve
    assert "decoder v3" in ready_body["compatibility"] and "64 audio tokens" in ready_body["compatibility"]
    assert ready_body["versions"]["decoder"]["v3"] == "incompatible"
    log = (ready.log_dir / "gateway.log").read_text()
    assert "version refused: incompatible with the LM" in log
    with GatewayClient(ready.gateway_url, ready.api_key) as c:
        r = c.http.post("/v1/sessions", json={"versions": {"decoder": "v3"}})
        assert r.status_code == 409 and "decoder v3" in r.text and "32 speech codes" in r.text
        r = c.http.post("/v1/sessions", json={"versions": {"decoder": "v9"}})
        assert r.status_code == 404 and "unknown decoder version" in r.text and "v1, v2, v3" in r.text
        r = c.http.post("/v1/sessions", json={"versions": {"lm": "x"}})
        assert r.status_code == 422


def test_weights_are_respected_over_200_sessions(ready: LocalStack) -> None:
    counts: Counter[str] = Counter()
    with GatewayClient(ready.gateway_url, ready.api_key) as c:
        for _ in range(200):
            counts[c.create_session()["versions"]["decoder"]] += 1
    assert counts["v3"] == 0
    # v1 has weight 3 of 4: mean 150, standard deviation 6.1; 5 deviations either side
    assert 119 <= counts["v1"] <= 181, counts
    assert counts["v1"] + counts["v2"] == 200


def test_sessions_stay_on_their_version_across_turns_and_restarts(ready: LocalStack) -> None:
    with GatewayClient(ready.gateway_url, ready.api_key) as c:
        pinned = c.create_session(**FAST, versions={"decoder": "v2"})
        assert pinned["versions"]["decoder"] == "v2"
        assert "versions" not in pinned["settings"]
        v1_before = metric(ready, "glmv_decoder_tokens_total", "decoder")
        v2_before = metric(ready, "glmv_decoder_tokens_total", "decoder_v2")
        for text in ("Tell me a story.", "And then?"):
            result = c.turn(pinned["id"], text=text)
            assert result.error is None and result.done["partial"] is False
            assert c.get_session(pinned["id"])["versions"]["decoder"] == "v2"
        v2_after = metric(ready, "glmv_decoder_tokens_total", "decoder_v2")
        assert v2_after > v2_before, "the pinned version decoded nothing"
        assert metric(ready, "glmv_decoder_tokens_total", "decoder") == v1_before
        assert metric(ready, "glmv_gateway_component_calls_total", "gateway", 'version="v2"') >= 2

    ready.restart_gateway()
    wait_for(lambda: decoder_states(ready).get("v2") == "serving", "v2 serving after the restart")
    with GatewayClient(ready.gateway_url, ready.api_key) as c:
        assert c.get_session(pinned["id"])["versions"]["decoder"] == "v2"
        assert c.turn(pinned["id"], text="Go on.").error is None
    assert metric(ready, "glmv_decoder_tokens_total", "decoder_v2") > v2_after
    assert metric(ready, "glmv_decoder_tokens_total", "decoder") == v1_before


def test_lm_turns_go_to_the_replica_holding_the_session_prefix(ready: LocalStack) -> None:
    with GatewayClient(ready.gateway_url, ready.api_key) as c:
        sessions = [c.create_session(**FAST, mode="text")["id"] for _ in range(8)]
        for sid in sessions:
            for text in ("Hello there.", "Tell me more."):
                assert c.turn(sid, text=text).error is None
        for sid in sessions:
            turns = c.history(sid)["turns"]
            # the second turn's prompt starts with the whole first prompt (and reply): reused from the
            # cache of the replica that served the first turn (any prompt shares the system prompt,
            # so only reusing at least the first prompt shows the same replica served both)
            first, second = turns[0]["usage"], turns[1]["usage"]
            assert second["lm_cached_prompt_tokens"] >= first["prompt_tokens"], (first, second)
    # and both replicas serve some of the sessions
    assert metric(ready, "glmv_lm_requests_total", "lm") > 0
    assert metric(ready, "glmv_lm_requests_total", "lm2") > 0
    assert metric(ready, "glmv_gateway_lm_replica_calls_total", "gateway", 'affinity="fallback"') == 0


def set_decoder_registry(stack: LocalStack, **changes: dict[str, Any]) -> None:
    """Rewrite the registry file with ``changes`` applied per version id."""
    path: Path = stack.versions_file  # type: ignore[attr-defined]
    registry = json.loads(path.read_text())
    registry["decoder"] = [{**v, **changes.get(v["id"], {})} for v in registry["decoder"]]
    path.write_text(json.dumps(registry))


def test_draining_version_keeps_its_sessions_and_gets_no_new_ones(ready: LocalStack) -> None:
    with GatewayClient(ready.gateway_url, ready.api_key) as c:
        kept = c.create_session(**FAST, versions={"decoder": "v2"})["id"]
        set_decoder_registry(ready, v2={"draining": True})
        try:
            wait_for(lambda: decoder_states(ready)["v2"] == "draining", "v2 draining")
            assert {v["id"]: v["traffic_share"] for v in models(ready)["decoder"]}["v2"] == 0
            assert {c.create_session()["versions"]["decoder"] for _ in range(30)} == {"v1"}
            r = c.http.post("/v1/sessions", json={"versions": {"decoder": "v2"}})
            assert r.status_code == 409 and "draining" in r.text
            before = metric(ready, "glmv_decoder_tokens_total", "decoder_v2")
            assert c.turn(kept, text="Still there?").error is None
            assert c.get_session(kept)["versions"]["decoder"] == "v2"
            assert metric(ready, "glmv_decoder_tokens_total", "decoder_v2") > before
        finally:
            set_decoder_registry(ready, v2={"draining": False})
        wait_for(lambda: decoder_states(ready)["v2"] == "serving", "v2 serving again")


def test_killing_a_version_moves_its_sessions(ready: LocalStack) -> None:
    with GatewayClient(ready.gateway_url, ready.api_key) as c:
        victims = [c.create_session(**FAST, versions={"decoder": "v2"})["id"] for _ in range(3)]
        ready.kill("decoder_v2")
        wait_for(lambda: decoder_states(ready)["v2"].startswith("unreachable"), "v2 seen down")
        assert httpx.get(f"{ready.gateway_url}/readyz").status_code == 200
        for sid in victims:
            assert c.get_session(sid)["versions"]["decoder"] == "v1"  # the only compatible one left
        log = (ready.log_dir / "gateway.log").read_text()
        assert len(re.findall(r"session moved to another decoder version: v2 -> v1 \(failed\)", log)) >= 3
        before = metric(ready, "glmv_decoder_tokens_total", "decoder")
        result = c.turn(victims[0], text="Are you there?")
        assert result.error is None and result.done["partial"] is False
        assert metric(ready, "glmv_decoder_tokens_total", "decoder") > before
        assert metric(ready, "glmv_gateway_version_moves_total", "gateway", 'from_version="v2"') >= 3
        # new sessions avoid the failed version
        assert {c.create_session()["versions"]["decoder"] for _ in range(20)} == {"v1"}
        # a version removed from the registry: its sessions move with reason "removed"
        on_v1 = c.create_session(**FAST)["id"]
        path: Path = ready.versions_file  # type: ignore[attr-defined]
        registry = json.loads(path.read_text())
        registry["decoder"] = [v for v in registry["decoder"] if v["id"] != "v1"] + [
            {"id": "v1b", "addresses": [ready.addr("decoder")], "weight": 1}
        ]
        path.write_text(json.dumps(registry))
        wait_for(lambda: decoder_states(ready).get("v1b") == "serving", "v1b in the registry")
        assert c.get_session(on_v1)["versions"]["decoder"] == "v1b"
        log = (ready.log_dir / "gateway.log").read_text()
        assert "session moved to another decoder version: v1 -> v1b (removed)" in log
