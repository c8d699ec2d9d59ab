"""Schemathesis against the running gateway: every documented operation, all checks (status codes
and bodies as documented, no 5xx, negative data refused, ...), then stateful runs that follow the
document's links (create a session → turn → history → delete). Bounded: a few examples each, a
time budget, a fixed seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from glmv_gateway.stack import LocalStack

from .conftest import stack_db, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ST = str(Path(sys.executable).parent / "st")
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def contract_stack(dev_models, tmp_path_factory: pytest.TempPathFactory):
    running = start_stack(
        dev_models,
        tmp_path_factory.mktemp("contract"),
        db=stack_db("own"),
        # generated sessions may ask for 8192 tokens: keep each turn short
        GLMV_GATEWAY_TURN_TIMEOUT_S="20",
        GLMV_GATEWAY_MAX_TURNS_PER_KEY="64",
    )
    yield running
    running.stop()


def run_schemathesis(
    stack: LocalStack, tmp: Path, phases: str, max_examples: int, max_time: int, *extra: str
) -> None:
    command = [
        *(ST, "--config-file", str(CONFIG), "run", f"{stack.gateway_url}/openapi.json"),
        *("--url", stack.gateway_url),
        *("--checks", "all", "--phases", phases),
        *("-H", f"Authorization: Bearer {stack.api_key}"),
        *("--max-examples", str(max_examples), "--max-time", str(max_time), "--seed", "17"),
        *("--request-timeout", "60", "--workers", "1", "--no-color"),
        *("--report", "junit", "--report-dir", str(tmp)),
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=max_time + 240, cwd=tmp)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]


def test_every_operation_matches_the_document(contract_stack: LocalStack, tmp_path: Path) -> None:
    run_schemathesis(contract_stack, tmp_path, "examples,coverage,fuzzing", max_examples=12, max_time=150)


def test_stateful_links(contract_stack: LocalStack, tmp_path: Path) -> None:
    # DELETE /v1/jobs/{id} cancels a job, which stays readable (state "cancelled") until it expires,
    # so schemathesis's use-after-free check (which reads DELETE as removal) does not apply; for
    # sessions, where DELETE removes, test_deleted_session_is_gone checks it.
    run_schemathesis(
        contract_stack, tmp_path, "stateful", 10, 90, "--exclude-checks", "use_after_free"
    )


def test_deleted_session_is_gone(contract_stack: LocalStack) -> None:
    auth = {"Authorization": f"Bearer {contract_stack.api_key}"}
    with httpx.Client(base_url=contract_stack.gateway_url, headers=auth, timeout=60) as http:
        session_id = http.post("/v1/sessions", json={"max_new_tokens": 8}).json()["id"]
        turn = http.post(f"/v1/sessions/{session_id}/turns?stream=false", json={"text": "hi"})
        assert turn.status_code == 200, turn.text
        assert http.delete(f"/v1/sessions/{session_id}").status_code == 204
        for method, path in (
            ("GET", f"/v1/sessions/{session_id}"),
            ("GET", f"/v1/sessions/{session_id}/history"),
            ("PATCH", f"/v1/sessions/{session_id}"),
            ("DELETE", f"/v1/sessions/{session_id}"),
        ):
            assert http.request(method, path, json={} if method == "PATCH" else None).status_code == 404
        response = http.post(f"/v1/sessions/{session_id}/turns", json={"text": "hi"})
        assert response.status_code == 404
