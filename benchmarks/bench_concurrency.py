"""Concurrent sessions through the full stack, continuous batching vs LM batch size 1 (issue 4).

Two stacks run side by side on the same checkpoints: one with the LM's continuous batching
(``GLMV_LM_MAX_BATCH_SIZE=16``), one with ``GLMV_LM_MAX_BATCH_SIZE=1``. For each level N (1, 2, 4, 8,
16) N sessions start at once, each doing ``--turns`` spoken turns back to back (history grows), first
on one stack then on the other (the order alternates per level).

Figures per level: aggregate LM tokens/s (all completion tokens / wall time of the level), TTFA p50/p95,
RTF p95 (per turn: turn time / reply audio), errors. Targets at 8 sessions: aggregate LM tokens/s ≥ 5 ×
one session, TTFA p95 ≤ 2 × one session.

    .venv/bin/python benchmarks/bench_concurrency.py [--levels 1,2,4,8,16] [--turns 3] [--profile realsize]
"""

from __future__ import annotations

import argparse
import threading
import time

import common as C


def run_level(stack: object, wav: bytes, n: int, turns: int, s: C.TurnSettings) -> tuple[float, list]:
    from glmv_gateway.client import GatewayClient

    results: list[C.TurnTiming] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n + 1)

    def session(k: int) -> None:
        with GatewayClient(stack.gateway_url, stack.api_key) as client:  # type: ignore[attr-defined]
            body = {**s.session_body(), "seed": k}
            sid = client.create_session(**body)["id"]
            barrier.wait()
            for _ in range(turns):
                r = C.stack_turn(client, wav, s, session_id=sid)
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)
    ap.add_argument("--levels", default="1,2,4,8,16", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-audio-tokens", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--modes", default="batched,bs=1")
    args = ap.parse_args()
    print(f"# bench_concurrency: profile {args.profile}, device {args.device}/{args.dtype}; "
          f"{C.machine_info(args.device)}")
    models = C.prepare_models(args)
    _, _, wav = C.question_audio()
    modes = {"batched": "16", "bs=1": "1"}
    wanted = args.modes.split(",")
    stacks = {}
    rows, summary = [], {}
    try:
        for k, mode in enumerate(wanted):
            stacks[mode] = C.start_stack(models, args, db=args.redis_db + k,
                                         extra={"GLMV_LM_MAX_BATCH_SIZE": modes[mode]})
        s = C.TurnSettings(max_audio_tokens=args.max_audio_tokens, max_new_tokens=args.max_new_tokens)
        for mode in wanted:  # warm-up
            run_level(stacks[mode], wav, 2, 1, s)
        for i, n in enumerate(args.levels):
            for mode in (wanted if i % 2 == 0 else wanted[::-1]):
                wall, rs = run_level(stacks[mode], wav, n, args.turns, s)
                ok = [r for r in rs if r.error is None]
                tps = sum(r.completion_tokens for r in ok) / wall
                row = [n, mode, len(ok), len(rs) - len(ok), tps, C.med([r.lm_tps for r in ok]),
                       C.med([r.ttfa_ms for r in ok]), C.pct([r.ttfa_ms for r in ok], 95),
                       C.pct([r.rtf for r in ok], 95), wall]
                summary[(n, mode)] = row
                print("  " + " ".join(C.fmt(x) for x in row), flush=True)
    finally:
        for st in stacks.values():
            st.stop()
    rows = [summary[k] for k in sorted(summary, key=lambda k: (k[0], k[1]))]
    C.table(f"concurrent sessions, {args.profile} profile ({args.turns} turns per session)",
            ["sessions", "LM", "ok", "err", "agg LM tok/s", "per-turn LM tok/s p50", "TTFA p50 ms",
             "TTFA p95 ms", "RTF p95", "wall s"], rows)
    rows = []
    for mode in wanted:
        one = summary.get((1, mode))
        for n in args.levels:
            r = summary.get((n, mode))
            if one and r and n > 1:
                rows.append([n, mode, r[4] / one[4], r[7] / one[7]])
    C.table("relative to one session (targets at 8: tok/s ≥ 5×, TTFA p95 ≤ 2×)",
            ["sessions", "LM", "agg tok/s ×", "TTFA p95 ×"], rows, digits=2)


if __name__ == "__main__":
    main()
