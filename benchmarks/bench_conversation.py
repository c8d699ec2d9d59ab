"""Duplex conversations with server-side turn detection: end of speech → first reply audio, and
the latency of a voice barge-in, through the native WebSocket of a running stack.

    .venv/bin/python benchmarks/bench_conversation.py                    # dev profile
    .venv/bin/python benchmarks/bench_conversation.py --profile realsize

Each client sends ``samples/question.wav`` paced in real time (20 ms frames) followed by silence,
with ``turn_detection`` = ``server_vad`` and ``silence_duration_ms`` = 500, and never commits.

* **end of speech → first audio**: from the moment the last loud sample of the question was sent to
  the first ``audio.delta`` received; it includes the 500 ms of silence the detector must hear, so
  the target on dev is p50 ≤ 750 ms (silence + 250 ms for the last tokenizer block, the LM's
  first audio tokens and the first decoder chunk). Also split into: speech_stopped event arrival,
  committed, turn.started (client side).
* **barge-in**: during a long reply the client starts speaking again; from the moment the first
  loud sample of that speech was sent to ``turn.cancelled`` and to the last ``audio.delta`` before
  it. Target p95 ≤ 150 ms + one decoder chunk.
Runs 1 conversation at a time, then ``--concurrent`` at once. Tables to stdout and to
``benchmarks/results/<date>-<profile>-conversation.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

FRAME_MS = 20
VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


def loud_bounds(x: np.ndarray, rate: int) -> tuple[float, float]:
    loud = np.flatnonzero(np.abs(x) > 0.01)
    return loud[0] / rate, (loud[-1] + 1) / rate


class Listener(threading.Thread):
    """Receives every event with its arrival time."""

    def __init__(self, ws) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.ws, self.events, self.lock = ws, [], threading.Lock()

    def run(self) -> None:
        try:
            while True:
                message = self.ws.recv()
                if isinstance(message, bytes):
                    continue
                with self.lock:
                    self.events.append((time.perf_counter(), json.loads(message)))
        except Exception:
            return

    def wait_for(self, kind: str, after: float = 0.0, timeout: float = 120) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, e in self.events:
                    if e["type"] == kind and t >= after:
                        return t
                    if e["type"] == "error":
                        raise RuntimeError(e["message"])
            time.sleep(0.005)
        return None


def send_paced(ws, pcm: bytes, start: float) -> None:  # type: ignore[no-untyped-def]
    step = 16000 * 2 * FRAME_MS // 1000
    for i, offset in enumerate(range(0, len(pcm), step)):
        due = start + i * FRAME_MS / 1000
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ws.send(pcm[offset : offset + step])


def one_turn(url: str, client, body: dict, voice: np.ndarray, barge: bool) -> dict:  # type: ignore[no-untyped-def]
    from websockets.sync.client import connect

    from glmv_common import audio as audio_io

    session = client.create_session(**body, turn_detection=VAD)
    lead = np.zeros(int(0.3 * 16000), np.float32)
    tail = np.zeros(int(1.2 * 16000), np.float32)
    _, end_s = loud_bounds(voice, 16000)
    start_s, _ = loud_bounds(voice, 16000)
    out: dict = {}
    key = client.http.headers["Authorization"].removeprefix("Bearer ")
    with connect(f"{url}/v1/sessions/{session['id']}/ws?api_key={key}") as ws:
        listener = Listener(ws)
        listener.start()
        t0 = time.perf_counter() + 0.05
        send_paced(ws, audio_io.encode_pcm(np.concatenate([lead, voice, tail]), "pcm16"), t0)
        t_end = t0 + len(lead) / 16000 + end_s
        first = listener.wait_for("audio.delta", after=t_end)
        if first is None:
            return {"error": "no reply audio"}
        out["eos_to_audio_ms"] = (first - t_end) * 1000
        for kind in ("input.speech_stopped", "input.committed", "turn.started"):
            t = listener.wait_for(kind, timeout=1)
            out[kind] = (t - t_end) * 1000 if t else None
        if barge:
            time.sleep(0.2)  # the reply plays for a while, then the user talks over it
            t1 = time.perf_counter() + 0.02
            onset = t1 + start_s
            send_paced(ws, audio_io.encode_pcm(voice[: int(16000 * (start_s + 0.6))], "pcm16"), t1)
            cancelled = listener.wait_for("turn.cancelled", after=t1, timeout=10)
            if cancelled is None:
                done = listener.wait_for("turn.done", after=first, timeout=0.1)
                out["error" if done is None else "reply_over"] = "no turn.cancelled"
            else:
                with listener.lock:
                    audio_times = [
                        t for t, e in listener.events if e["type"] == "audio.delta" and t <= cancelled
                    ]
                out["barge_cancel_ms"] = (cancelled - onset) * 1000
                out["barge_last_audio_ms"] = (max(audio_times) - onset) * 1000 if audio_times else 0.0
        else:
            listener.wait_for("turn.done", after=first)
    return out


def run(args: argparse.Namespace) -> str:
    from glmv_gateway.client import GatewayClient

    models = C.prepare_models(args)
    voice, rate, _ = C.question_audio()
    assert rate == 16000
    stack = C.start_stack(models, args)
    lines = [f"# Conversation benchmark ({args.profile})", "", C.machine_info(args.device), ""]
    try:
        url = stack.gateway_url.replace("http", "ws")
        short = C.TurnSettings(max_new_tokens=120, max_audio_tokens=80).session_body()
        long = C.TurnSettings(max_new_tokens=600, max_audio_tokens=500, schedule=(10, 25)).session_body()
        with GatewayClient(stack.gateway_url, stack.api_key) as client:
            one_turn(url, client, short, voice, barge=False)  # warm-up
            rows = []
            for label, n in (("1 conversation", 1), (f"{args.concurrent} concurrent", args.concurrent)):
                eos: list[dict] = []
                barge: list[dict] = []
                for _ in range(max(1, args.turns // n)):
                    with ThreadPoolExecutor(n) as pool:
                        eos += list(pool.map(lambda _: one_turn(url, client, short, voice, False), range(n)))
                        barge += list(pool.map(lambda _: one_turn(url, client, long, voice, True), range(n)))
                ok = [r for r in eos if "error" not in r]
                okb = [r for r in barge if "error" not in r and "barge_cancel_ms" in r]
                e2a = [r["eos_to_audio_ms"] for r in ok]
                stop = [r["input.speech_stopped"] for r in ok if r.get("input.speech_stopped") is not None]
                started = [r["turn.started"] for r in ok if r.get("turn.started") is not None]
                cancel = [r["barge_cancel_ms"] for r in okb]
                last = [r["barge_last_audio_ms"] for r in okb]
                over = sum(1 for r in barge if "reply_over" in r)
                errors = len(eos) - len(ok) + sum(1 for r in barge if "error" in r)
                rows.append([label, len(ok), C.pct(e2a, 50), C.pct(e2a, 95), C.med(stop), C.med(started),
                             len(okb), over, C.pct(cancel, 50), C.pct(cancel, 95), C.pct(last, 95),
                             errors])  # fmt: skip
        lines.append(C.table(
            "End of speech → first reply audio (silence_duration_ms 500) and voice barge-in latency (ms)",
            ["load", "turns", "EoS→audio p50", "EoS→audio p95", "EoS→stopped p50", "EoS→turn.started p50",
             "barge-ins", "reply over first", "onset→cancelled p50", "onset→cancelled p95",
             "onset→last audio p95", "errors"],
            rows,
        ))  # fmt: skip
    finally:
        stack.stop()
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)
    ap.add_argument("--turns", type=int, default=8, help="turns per load level")
    ap.add_argument("--concurrent", type=int, default=4)
    args = ap.parse_args()
    report = run(args)
    print(report)
    out = C.REPO / "benchmarks" / "results" / f"{datetime.date.today()}-{args.profile}-conversation.md"
    out.write_text(report + "\n")


if __name__ == "__main__":
    main()
