"""``glmv stack up`` as a real process: a dead service is restarted with backoff while the rest keeps
serving; SIGTERM / SIGHUP stop every child; SIGKILL of the stack leaves no child behind either."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from glmv_gateway.client import GatewayClient
from glmv_gateway.stack import DEV_API_KEY, free_port, port_open

from ..conftest import REDIS_PORT
from .conftest import alive, children_of, cmdline, readyz, stack_db, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class StackUp:
    def __init__(self, dev_models: dict[str, Path], tmp: Path, private_redis: bool = False) -> None:
        import redis

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = tmp / "logs"
        if private_redis:  # the stack starts its own redis-server there
            self.redis_port = free_port()
            redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        else:
            redis_url = f"redis://127.0.0.1:{REDIS_PORT}/{stack_db('own')}"
            redis.Redis.from_url(redis_url).flushdb()
        glmv = str(Path(sys.executable).parent / "glmv")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "GLMV_GATEWAY_JOBS_DIR": str(tmp / "jobs"),
            "GLMV_GATEWAY_DRAIN_TIMEOUT_S": "3",
            "GLMV_LM_DRAIN_TIMEOUT_S": "3",
            "GLMV_TOKENIZER_DRAIN_TIMEOUT_S": "3",
            "GLMV_DECODER_DRAIN_TIMEOUT_S": "3",
            "GLMV_PARENT_GRACE_S": "5",
        }
        self.proc = subprocess.Popen(
            [
                *(glmv, "stack", "up", "--models", str(dev_models["lm"].parent)),
                *("--port", str(self.port), "--port-base", "0", "--logs", str(self.logs)),
                *("--redis-url", redis_url),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "stack.err", "wb"),  # noqa: SIM115 - closed with the process
        )
        self.err = tmp / "stack.err"
        wait_for(lambda: readyz(self.url) == 200 or self.proc.poll() is not None, 300, "the stack")
        assert self.proc.poll() is None, self.err.read_text()[-3000:]
        self.children = children_of(self.proc.pid)
        assert len(self.children) >= 5, [cmdline(p) for p in self.children]

    def pid_of(self, name: str) -> int:
        for pid in children_of(self.proc.pid):
            if name in cmdline(pid):
                return pid
        raise AssertionError(f"no {name} process under the stack")

    def assert_all_gone(self, timeout: float) -> None:
        try:
            wait_for(lambda: not any(alive(p) for p in self.children), timeout, "every child to exit")
        except AssertionError:
            left = [f"{p}: {cmdline(p)}" for p in self.children if alive(p)]
            raise AssertionError(f"still running {timeout:.0f} s later: {left}") from None
        assert not port_open("127.0.0.1", self.port)

    def cleanup(self) -> None:
        for pid in self.children | children_of(self.proc.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def stack_up(dev_models, tmp_path: Path, request: pytest.FixtureRequest):
    running = StackUp(dev_models, tmp_path, private_redis=getattr(request, "param", False))
    yield running
    running.cleanup()


def test_dead_service_is_restarted_and_sigterm_stops_everything(stack_up: StackUp) -> None:
    gateway_pid = stack_up.pid_of("glmv gateway")
    decoder_pid = stack_up.pid_of("glmv-decoder")
    os.kill(decoder_pid, signal.SIGKILL)
    # while the decoder is down the gateway keeps answering and says it is not ready
    assert wait_for(lambda: readyz(stack_up.url) == 503, 30, "/readyz 503", interval=0.05)
    wait_for(lambda: readyz(stack_up.url) == 200, 240, "/readyz 200 again")
    new_decoder = stack_up.pid_of("glmv-decoder")
    assert new_decoder != decoder_pid
    assert stack_up.pid_of("glmv gateway") == gateway_pid
    log = (stack_up.logs / "supervisor.log").read_text()
    assert f"decoder (pid {decoder_pid}) exited with signal 9" in log and "restarting in 0.5 s" in log
    with GatewayClient(stack_up.url, DEV_API_KEY) as client:
        session = client.create_session(max_new_tokens=16, seed=1)
        assert client.turn(session["id"], text="hi").error is None
    stack_up.children |= children_of(stack_up.proc.pid)

    stack_up.proc.send_signal(signal.SIGTERM)
    assert stack_up.proc.wait(timeout=60) == 0
    stack_up.assert_all_gone(10)
    assert "SIGTERM: stopping the stack" in stack_up.err.read_text()


def test_sighup_stops_everything(stack_up: StackUp) -> None:
    stack_up.proc.send_signal(signal.SIGHUP)
    assert stack_up.proc.wait(timeout=60) == 0
    stack_up.assert_all_gone(10)


@pytest.mark.parametrize("stack_up", [True], indirect=True, ids=["own-redis"])
def test_children_do_not_outlive_a_sigkilled_stack(stack_up: StackUp) -> None:
    assert any("redis-server" in cmdline(p) for p in stack_up.children)
    stack_up.proc.kill()
    stack_up.proc.wait()
    # each child notices within half a second, drains (3 s here) and exits, or is gone for good 5 s
    # later; redis-server is stopped by its sidecar (generous bound: a loaded machine exits slowly)
    stack_up.assert_all_gone(90)
    assert not port_open("127.0.0.1", stack_up.redis_port)
