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



def watch_for(target: int, interval: float = 0.25) -> int:
    """A sidecar for a process that cannot watch its parent itself (redis-server): started by the
    same supervisor with ``GLMV_PARENT_PID``, it sends ``target`` SIGTERM once the supervisor is
    gone, then exits; it also exits when ``target`` does."""
    expected = int(os.environ.pop(ENV, "0") or 0) or os.getppid()
    while True:
        try:
            os.kill(target, 0)
        except ProcessLookupError:
            return 0
        if os.getppid() != expected:
            try:
                os.kill(target, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return 0
        time.sleep(interval)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--watch" or not sys.argv[2].isdigit():
        raise SystemExit("usage: python -m glmv_common.parent --watch PID")
    raise SystemExit(watch_for(int(sys.argv[2])))
