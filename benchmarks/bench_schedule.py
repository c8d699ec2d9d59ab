"""Chunk schedule: our first chunk of 10 tokens vs the reference demo's 25, 50, 100, 150, 200 (issue 3).

Same models, same prompt, same seeds: each turn index runs with both schedules, interleaved (the order
alternates), in-process and through the full stack (the session's ``chunk_schedule``). Since the LM
output is identical for both schedules, the token speed is equal by construction (the LM tok/s
column shows it); only the decoder chunking differs.

Target: TTFA(ours) ≤ 0.65 × TTFA(reference).

    .venv/bin/python benchmarks/bench_schedule.py [--profile realsize] [--turns 10] [--sides stack,in-process]
"""

from __future__ import annotations

import argparse

import common as C

SCHEDULES = {"ours 10,25,50,100,150,200": C.OURS, "reference 25,50,100,150,200": C.REFERENCE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sides", default="stack,in-process")
    ap.add_argument("--max-audio-tokens", type=int, default=150)
    ap.add_argument("--max-new-tokens", type=int, default=240)
    args = ap.parse_args()
    from glmv_gateway.client import GatewayClient

    print(f"# bench_schedule: profile {args.profile}, device {args.device}/{args.dtype}; "
          f"{C.machine_info(args.device)}")
    models = C.prepare_models(args)
    audio, rate, wav = C.question_audio()
    sides = args.sides.split(",")
    stack = C.start_stack(models, args) if "stack" in sides else None
    res: dict[tuple[str, str], list[C.TurnTiming]] = {(s, n): [] for s in sides for n in SCHEDULES}
    try:
        inproc = C.InProcess(models, args.device, args.dtype) if "in-process" in sides else None
        client = GatewayClient(stack.gateway_url, stack.api_key) if stack else None
        names = list(SCHEDULES)
        for i in range(-args.warmup, args.turns):
            for side in sides:
                for name in (names if i % 2 == 0 else names[::-1]):
                    s = C.TurnSettings(seed=max(i, 0) % 7, schedule=SCHEDULES[name],
                                       max_audio_tokens=args.max_audio_tokens,
                                       max_new_tokens=args.max_new_tokens)
                    r = (C.stack_turn(client, wav, s) if side == "stack"
                         else inproc.turn(audio, rate, s))  # type: ignore[union-attr]
                    if i >= 0:
                        res[(side, name)].append(r)
        if client:
            client.close()
        if inproc:
            inproc.close()
    finally:
        if stack:
            stack.stop()
    rows = []
    for (side, name), rs in res.items():
        rows.append([side, name, C.med([r.ttfa_ms for r in rs]), C.pct([r.ttfa_ms for r in rs], 95),
                     C.med([r.total_ms for r in rs]), C.med([r.rtf for r in rs]),
                     C.med([r.audio_tokens for r in rs]), C.med([r.lm_tps for r in rs])])
    C.table(f"chunk schedule, {args.profile} profile ({args.turns} turns each)",
            ["side", "schedule", "TTFA p50 ms", "TTFA p95", "total p50 ms", "RTF p50", "audio tok",
             "LM tok/s"], rows)
    rows = []
    ours, ref = names
    for side in sides:
        a, b = res[(side, ours)], res[(side, ref)]
        per_turn = [x.ttfa_ms / y.ttfa_ms for x, y in zip(a, b, strict=True) if x.ttfa_ms and y.ttfa_ms]
        rows.append([side, C.med([r.ttfa_ms for r in a]) / C.med([r.ttfa_ms for r in b]), C.med(per_turn),
                     C.med([r.total_ms for r in a]) / C.med([r.total_ms for r in b])])
    C.table("ours / reference (target: TTFA ratio ≤ 0.65)",
            ["side", "TTFA (ratio of p50s)", "TTFA (p50 of per-turn ratios)", "total (ratio of p50s)"],
            rows, digits=2)


if __name__ == "__main__":
    main()
