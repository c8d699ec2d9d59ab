"""Processes started by a supervisor (``glmv stack up``, a test) stop when it is gone.

The supervisor puts its pid in ``GLMV_PARENT_PID``; :func:`watch_parent` (called first thing by each
service, the gateway and the worker) removes it from the environment (so processes this one starts
do not watch the wrong parent) and runs a daemon thread that notices when this process's parent
changes (the supervisor died, even by SIGKILL, and the process was re-parented). It then sends
itself SIGTERM, so the usual drain runs, and exits for good after ``GLMV_PARENT_GRACE_S``.

No ``preexec_fn`` and no ``PR_SET_PDEATHSIG``: the first breaks gRPC in forked children, the second
fires when the *thread* that forked exits rather than the process.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from glmv_common.logs import get_logger

ENV = "GLMV_PARENT_PID"
GRACE_ENV = "GLMV_PARENT_GRACE_S"

log = get_logger("glmv.parent")


def _orphaned(expected: int, grace: float) -> None:
    log.warning("the supervising process %d is gone: stopping", expected)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    log.error("still running %.0f s after the supervisor died: exiting now", grace)
    os._exit(1)


def watch_parent(interval: float = 0.5) -> threading.Thread | None:
    """Start the watchdog if a supervisor asked for it; returns the thread (None if not asked)."""
    raw = os.environ.pop(ENV, "")
    grace_raw = os.environ.pop(GRACE_ENV, "")
    if not raw.isdigit():
        return None
    expected = int(raw)
    try:
        grace = float(grace_raw) if grace_raw else 10.0
    except ValueError:
        grace = 10.0

    def run() -> None:
        while os.getppid() == expected:
            time.sleep(interval)
        _orphaned(expected, grace)

    thread = threading.Thread(target=run, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def guard(argv: list[str]) -> int:
    """Run ``argv`` (a program that cannot watch its parent itself, e.g. redis-server) as a child;
    forward SIGTERM/SIGINT/SIGHUP to it, and stop it when this process's own parent is gone."""
    import subprocess

    expected = int(os.environ.pop(ENV, "0") or 0) or os.getppid()
    child = subprocess.Popen(argv)

    def forward(signum: int, frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while child.poll() is None:
        if os.getppid() != expected:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
            break
        time.sleep(0.25)
    return child.wait()


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    raise SystemExit(guard(args[1:] if args[:1] == ["--"] else args))
