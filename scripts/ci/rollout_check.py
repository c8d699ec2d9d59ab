"""Container CI: roll a new decoder version out while sessions talk, then try an incompatible one.

Run by scripts/container-ci.sh against the compose stack (the gateway reads the versions file that
``glmv rollout`` edits). Checks: no turn fails during the rollout, sessions pinned to the old version
move to the new one, new sessions land on it, the old container is gone; an incompatible version is
refused and rolled back (registry unchanged, its container removed) and the stack still talks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmv_gateway.client import GatewayClient, GatewayError


@dataclass
class Talker:
    url: str
    api_key: str
    stop: threading.Event
    session_id: str = ""
    turns: list[tuple[float, str]] = field(default_factory=list)  # (end time, "ok" or the error)

    def run(self) -> None:
        with GatewayClient(self.url, self.api_key, timeout=120) as client:
            # short replies: the check is about routing, not about long syntheses
            self.session_id = client.create_session(max_new_tokens=80, seed=len(self.turns))["id"]
            while not self.stop.is_set():
                try:
                    result = client.turn(self.session_id, text="hello there")
                    outcome = "ok" if not result.error and result.done else f"error: {result.error}"
                except GatewayError as exc:
                    outcome = f"error: {exc}"
                self.turns.append((time.monotonic(), outcome))


def fail(message: str) -> None:
    print(f"rollout-check: FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def say(message: str) -> None:
    print(f"rollout-check: {message}", file=sys.stderr, flush=True)


def decoder_versions(client: GatewayClient) -> dict[str, float]:
    models = client._json("GET", "/v1/models")
    return {v["id"]: v["traffic_share"] for v in models["components"]["decoder"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key", default="dev-key")
    parser.add_argument("--versions-file", required=True, type=Path)
    parser.add_argument("--talkers", type=int, default=2)
    parser.add_argument("--rollout", required=True, help="the glmv rollout command (JSON list)")
    parser.add_argument("--bad-rollout", required=True, help="an incompatible version's (JSON list)")
    parser.add_argument("--bad-container", required=True)
    parser.add_argument("--old-container", required=True, help="the decoder v1 container")
    args = parser.parse_args()

    stop = threading.Event()
    talkers = [Talker(args.url, args.api_key, stop) for _ in range(args.talkers)]
    threads = [threading.Thread(target=t.run, daemon=True) for t in talkers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while any(len(t.turns) < 1 for t in talkers):
        if time.monotonic() > deadline:
            fail(f"the talkers did not finish a first turn: {[t.turns for t in talkers]}")
        time.sleep(0.2)
    with GatewayClient(args.url, args.api_key) as client:
        pinned = {t.session_id: client.get_session(t.session_id).get("versions", {}) for t in talkers}
    if any(v.get("decoder") != "v1" for v in pinned.values()):
        fail(f"sessions were not pinned to decoder v1 before the rollout: {pinned}")
    say(f"{len(talkers)} sessions talking on decoder v1; rolling v2 out")

    t0 = time.monotonic()
    rollout = subprocess.run(json.loads(args.rollout))
    t1 = time.monotonic()
    time.sleep(3)  # a few more turns on the new version
    stop.set()
    for thread in threads:
        thread.join(timeout=180)
    if rollout.returncode != 0:
        fail(f"glmv rollout exited {rollout.returncode}")
    during = [o for t in talkers for end, o in t.turns if t0 <= end <= t1 + 3]
    errors = [o for t in talkers for _, o in t.turns if o != "ok"]
    say(f"{sum(len(t.turns) for t in talkers)} turns, {len(during)} during the rollout, {len(errors)} failed")
    if errors:
        fail(f"turns failed: {errors[:5]}")
    if len(during) < args.talkers:
        fail(f"too few turns during the rollout ({len(during)}) to show that none dropped")

    with GatewayClient(args.url, args.api_key) as client:
        moved = {t.session_id: client.get_session(t.session_id)["versions"].get("decoder") for t in talkers}
        if set(moved.values()) != {"v2"}:
            fail(f"sessions did not move to decoder v2: {moved}")
        fresh = client.create_session()
        if fresh.get("versions", {}).get("decoder") != "v2":
            fail(f"a new session landed on {fresh.get('versions')}, not decoder v2")
        shares = decoder_versions(client)
        if set(shares) != {"v2"}:
            fail(f"/v1/models still lists {shares}")
    registry = json.loads(args.versions_file.read_text())
    if [v["id"] for v in registry["decoder"]] != ["v2"]:
        fail(f"the registry file lists {registry['decoder']}")
    running = subprocess.run(["podman", "ps", "--format", "{{.Names}}"], capture_output=True, text=True)
    if args.old_container in running.stdout.split():
        fail(f"the old decoder container {args.old_container} still runs")
    say("rollout to v2: no turn dropped; old sessions moved, new ones land on v2; v1 stopped")

    before = args.versions_file.read_text()
    bad = subprocess.run(json.loads(args.bad_rollout))
    if bad.returncode == 0:
        fail("an incompatible decoder version was rolled out")
    if args.versions_file.read_text() != before:
        fail("the registry file was not restored after a failed rollout")
    names = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True)
    if args.bad_container in names.stdout.split():
        fail(f"{args.bad_container} was not removed after the failed rollout")
    with GatewayClient(args.url, args.api_key) as client:
        session = client.create_session(max_new_tokens=80)["id"]
        result = client.turn(session, text="still there?")
        if result.error or not result.done:
            fail(f"a turn after the refused rollout failed: {result.error}")
    say("incompatible version refused and rolled back; the stack still talks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
