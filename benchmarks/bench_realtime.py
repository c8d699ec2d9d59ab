"""The OpenAI Realtime endpoint vs the native WebSocket on the same spoken turns.

Each turn: a fresh session with the same settings and seed on both sides; samples/question.wav as
24 kHz PCM16 streamed in 100 ms pieces, then a commit; the reply is 24 kHz PCM16 on both sides.

* ``native``: ``WS /v1/sessions/{id}/ws`` — binary audio frames, ``{"type": "commit"}``;
* ``realtime``: ``WS /v1/realtime?session_id={id}`` — ``input_audio_buffer.append`` (base64 JSON),
  ``input_audio_buffer.commit`` and ``response.create`` (manual turn detection).

Figures: time from sending the commit to the first reply audio (``audio.delta`` /
``response.output_audio.delta``) at the client, and the gateway's own measure of it (the turn's
``speech_end_to_first_audio_ms``: commit received → first audio chunk ready), p50 and p95; the sides
alternate turn by turn and every turn is the same (same audio, settings and seed).
Target: realtime ≤ 1.05 × native.

    .venv/bin/python benchmarks/bench_realtime.py                 # dev profile, 20 turns per side
    .venv/bin/python benchmarks/bench_realtime.py --redis-port 6395 --turns 30
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import common as C
import numpy as np
import soxr
from websockets.sync.client import connect

SIDES = ("native", "realtime")
CHUNK = 4800  # 100 ms of 24 kHz PCM16


def speech_24k() -> bytes:
    audio, rate, _ = C.question_audio()
    out = soxr.resample(audio.astype(np.float32), rate, 24000)
    return (np.clip(out, -1, 1) * 32767).astype("<i2").tobytes()


def native_turn(ws_base: str, key: str, sid: str, pcm: bytes) -> tuple[float | None, float]:
    with connect(
        f"{ws_base}/v1/sessions/{sid}/ws?api_key={key}&encoding=pcm16&sample_rate=24000", max_size=None
    ) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.ready"
        for i in range(0, len(pcm), CHUNK):
            ws.send(pcm[i : i + CHUNK])
        t0 = time.perf_counter()
        ws.send(json.dumps({"type": "commit"}))
        first = None
        while True:
            msg = ws.recv(timeout=120)
            if isinstance(msg, bytes):
                continue
            event = json.loads(msg)
            if event["type"] == "audio.delta" and first is None:
                first = (time.perf_counter() - t0) * 1000
            if event["type"] in ("turn.done", "error"):
                return first, (time.perf_counter() - t0) * 1000


def realtime_turn(ws_base: str, key: str, sid: str, pcm: bytes) -> tuple[float | None, float]:
    with connect(
        f"{ws_base}/v1/realtime?model=glm-4-voice&session_id={sid}",
        additional_headers={"Authorization": f"Bearer {key}"},
        max_size=None,
    ) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        for i in range(0, len(pcm), CHUNK):
            audio = base64.b64encode(pcm[i : i + CHUNK]).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        t0 = time.perf_counter()
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        ws.send(json.dumps({"type": "response.create"}))
        first = None
        while True:
            event = json.loads(ws.recv(timeout=120))
            if event["type"] == "response.output_audio.delta" and first is None:
                first = (time.perf_counter() - t0) * 1000
            if event["type"] in ("response.done", "error"):
                return first, (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--redis-port", type=int, default=6379)
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()
    from glmv_gateway.client import GatewayClient
    from glmv_gateway.stack import LocalStack

    header = (
        f"# bench_realtime: profile {args.profile}, device {args.device}/{args.dtype}; "
        f"{C.machine_info(args.device)}"
    )
    print(header)
    models = C.prepare_models(args)
    pcm = speech_24k()
    stack = LocalStack(
        models=models,
        redis_url=f"redis://127.0.0.1:{args.redis_port}/{args.redis_db}",
        extra_env=C.stack_env(args),
        with_worker=False,
        log_dir=C.REPO / ".run" / "bench-logs",
    )
    stack.start(timeout=600)
    results: dict[str, list[tuple[float | None, float]]] = {s: [] for s in SIDES}
    server: dict[str, list[float | None]] = {s: [] for s in SIDES}
    run = {"native": native_turn, "realtime": realtime_turn}
    ws_base = stack.gateway_url.replace("http", "ws")
    try:
        with GatewayClient(stack.gateway_url, stack.api_key) as client:
            t_start = time.perf_counter()
            for i in range(-args.warmup, args.turns):
                s = C.TurnSettings(seed=0)  # the same turn every time: one reply, one latency distribution
                body = {**s.session_body(), "output": {"sample_rate": 24000, "encoding": "pcm16"}}
                order = SIDES if i % 2 == 0 else SIDES[::-1]
                for side in order:
                    sid = client.create_session(**body)["id"]
                    r = run[side](ws_base, stack.api_key, sid, pcm)
                    if i >= 0:
                        results[side].append(r)
                        turns = client.history(sid)["turns"]
                        timings = turns[0]["timings"] if turns else {}
                        server[side].append(timings.get("speech_end_to_first_audio_ms"))
            wall = time.perf_counter() - t_start
    finally:
        stack.stop()
    rows = []
    for side in SIDES:
        first = [f for f, _ in results[side] if f is not None]
        rows.append(
            [
                side,
                len(first),
                C.med(first),
                C.pct(first, 95),
                C.med(server[side]),
                C.pct(server[side], 95),
                C.med([t for _, t in results[side]]),
            ]
        )
    text = C.table(
        f"commit → first reply audio, {args.profile} profile ({args.turns} turns per side, alternating, "
        f"{wall:.0f} s)",
        [
            "side",
            "turns with audio",
            "client p50 ms",
            "client p95 ms",
            "gateway p50 ms",
            "gateway p95 ms",
            "turn end p50 ms",
        ],
        rows,
    )
    pairs = [
        (a[0], b[0]) for a, b in zip(results["native"], results["realtime"], strict=True) if a[0] and b[0]
    ]
    ratio = C.med([b for _, b in pairs]) / C.med([a for a, _ in pairs])
    per_turn = C.med([b / a for a, b in pairs])
    p95 = C.pct([b for _, b in pairs], 95) / C.pct([a for a, _ in pairs], 95)
    text += C.table(
        "realtime / native (target ≤ 1.05)",
        ["p50 ratio", "p50 of per-turn ratios", "p95 ratio"],
        [[ratio, per_turn, p95]],
        digits=3,
    )
    if args.out:
        args.out.write_text(
            f"{header}\n\nCommand: `.venv/bin/python benchmarks/bench_realtime.py "
            f"--redis-port {args.redis_port} --turns {args.turns}`\n{text}\n"
        )


if __name__ == "__main__":
    main()
