"""Phone calls through the full stack: Twilio Media Streams and Asterisk AudioSocket (issue 13).

Each simulated call (``glmv_gateway.phone_sim``: a Twilio client and an AudioSocket peer written
from the protocols) sends line silence, the spoken question (``samples/question.wav``) in real time
in 20 ms frames, then silence until the first reply frame arrives. Figures per transport and level:

* **caller end of speech → first reply frame** at the phone side (p50/p95): includes the silence the
  detector waits for (``silence_duration_ms``) before it ends the utterance;
* **detected end of speech → first frame sent** (p50/p95), the gateway's own per-call figure (stored in
  the call record): what the stack adds after the detector has decided;
* **CPU per call**: CPU seconds of every stack process (gateway, tokenizer, LM, decoder) during the
  level, divided by its calls (simulator CPU not included).

Levels: 1 call at a time (``--sequential`` calls in a row) and ``--concurrent`` calls at once.

    .venv/bin/python benchmarks/bench_telephony.py [--profile dev] [--sequential 5] [--concurrent 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import common as C
import redis

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


async def one_call(stack: Any, transport: str, speech: dict[str, bytes], timeout: float) -> dict[str, Any]:
    from glmv_gateway.phone_sim import AudioSocketCall, TwilioCall, silence

    if transport == "twilio":
        url = f"{stack.gateway_url.replace('http', 'ws')}/v1/telephony/twilio"
        sim: Any = TwilioCall(url, parameters={"greeting": ""})
        lead, question = silence(0.4, 8000, "mulaw"), speech["mulaw"]
        call_id = sim.call_sid
    else:
        sim = AudioSocketCall("127.0.0.1", stack.ports["audiosocket"])
        lead, question = silence(0.4, 8000), speech["pcm16"]
        call_id = str(sim.uuid)
    result: dict[str, Any] = {"call_id": call_id, "error": None, "client_ms": None}
    try:
        await sim.connect()
        await sim.send_audio(lead)
        await sim.send_audio(question, speech=True)
        ended = sim.speech_ended_at[-1]
        ok = await sim.send_silence_until(lambda: sim.first_reply_after(ended) is not None, timeout)
        if ok:
            result["client_ms"] = (sim.first_reply_after(ended) - ended) * 1000
        else:
            result["error"] = "no reply"
        if transport == "twilio":
            await sim.stop()
        else:
            await sim.hang_up()
    except Exception as exc:  # a benchmark reports, it does not stop
        result["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        await sim.close()
    return result


def server_latencies(stack: Any, call_ids: set[str], timeout: float = 30) -> dict[str, list[float]]:
    db = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    found: dict[str, list[float]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(found) < len(call_ids):
        for key in db.scan_iter("glmv:session:*"):
            if key.count(":") != 2:
                continue
            raw = db.hget(key, "call")
            if raw:
                record = json.loads(raw)
                if record.get("call_id") in call_ids and record.get("end"):
                    found[record["call_id"]] = record.get("speech_end_to_first_audio_ms") or []
        time.sleep(0.2)
    return found


async def level(stack: Any, transport: str, n: int, concurrent: bool, speech: dict[str, bytes]) -> list[dict]:
    if concurrent:
        return list(await asyncio.gather(*(one_call(stack, transport, speech, 120) for _ in range(n))))
    return [await one_call(stack, transport, speech, 120) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)
    ap.add_argument("--sequential", type=int, default=5, help="calls one at a time per transport")
    ap.add_argument("--concurrent", type=int, default=20, help="calls at once per transport")
    ap.add_argument("--transports", default="twilio,audiosocket")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--silence-ms", type=int, default=500, help="turn detection silence_duration_ms")
    ap.add_argument("--redis-port", type=int, default=6379)
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()

    from glmv_gateway.phone_sim import speech as load_speech
    from glmv_gateway.stack import LocalStack

    header = (
        f"# bench_telephony: profile {args.profile}, device {args.device}/{args.dtype}\n"
        f"{C.machine_info(args.device)}\n"
    )
    print(header)
    models = C.prepare_models(args)
    profile = {
        "max_new_tokens": args.max_new_tokens,
        "seed": 1234,
        "turn_detection": {"type": "server_vad", "silence_duration_ms": args.silence_ms},
    }
    env = {
        **C.stack_env(args),
        "GLMV_GATEWAY_TELEPHONY_PROFILE": json.dumps(profile),
        "GLMV_GATEWAY_TELEPHONY_MAX_CALLS_PER_KEY": "256",
    }
    stack = LocalStack(
        models=models,
        redis_url=f"redis://127.0.0.1:{args.redis_port}/{args.redis_db}",
        extra_env=env,
        with_worker=False,
        log_dir=REPO / ".run" / "bench-logs",
    )
    redis.Redis.from_url(stack.redis_url).flushdb()
    stack.start(timeout=600)
    sample = REPO / "samples" / "question.wav"
    speech = {"mulaw": load_speech(sample, 8000, "mulaw"), "pcm16": load_speech(sample, 8000, "pcm16")}
    rows = []
    try:
        pids = [p.pid for p in stack.procs.values()]
        asyncio.run(level(stack, "twilio", 1, False, speech))  # warm-up
        for transport in args.transports.split(","):
            for n, concurrent in ((args.sequential, False), (args.concurrent, True)):
                cpu0 = cpu_seconds(pids)
                t0 = time.perf_counter()
                results = asyncio.run(level(stack, transport, n, concurrent, speech))
                wall = time.perf_counter() - t0
                cpu = cpu_seconds(pids) - cpu0
                server = server_latencies(stack, {r["call_id"] for r in results})
                client = [r["client_ms"] for r in results if r["client_ms"] is not None]
                detected = [v[0] for v in server.values() if v]
                errors = [r["error"] for r in results if r["error"]]
                rows.append(
                    [
                        transport,
                        f"{n} at once" if concurrent else f"1 at a time ({n} calls)",
                        C.pct(client, 50) if client else None,
                        C.pct(client, 95) if client else None,
                        C.pct(detected, 50) if detected else None,
                        C.pct(detected, 95) if detected else None,
                        cpu / max(n, 1),
                        wall,
                        len(errors),
                    ]
                )
                if errors:
                    print(f"{transport} x{n}: errors: {errors[:3]}")
                print(rows[-1])
    finally:
        stack.stop()
    table = C.table(
        "End of caller speech → first reply audio frame (ms) and CPU per call",
        [
            "transport",
            "calls",
            "caller end → first frame p50",
            "p95",
            "detected end → first frame sent p50",
            "p95",
            "stack CPU s / call",
            "wall s",
            "errors",
        ],
        rows,
    )
    print(table)
    if args.out:
        args.out.write_text(header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
