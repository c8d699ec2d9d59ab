"""Turn latency through the full stack vs the same turn in-process (issue benchmarks 1 and 2).

One spoken turn (samples/question.wav) is run N times three ways, interleaved (the order rotates every
turn), with the same checkpoints, the same prompt and the same seed per turn index, so every side
consumes the same token sequence:

* ``in-process``: the model objects called directly in this process (no gRPC, no Redis, no HTTP);
* ``grpc``: the three services over gRPC from this process, no gateway (isolates the gateway's share);
* ``stack``: the gateway's HTTP streaming API (NDJSON) → tokenizer → LM → decoder → back, timed at
  the client: what a user sees.

Figures: time to first text (TTFT), time to first audio (TTFA), total, RTF = total / reply audio
length; p50 and p95 over the turns. The stage table shows where the time goes (tokenize, LM time to
first token, first decoder chunk flow/vocoder) from the services' own timing fields.

    .venv/bin/python benchmarks/bench_turn.py                       # dev profile, 20 turns
    .venv/bin/python benchmarks/bench_turn.py --profile realsize --turns 20
    .venv/bin/python benchmarks/bench_turn.py --device cuda --dtype bfloat16 --lm-model DIR \\
        --tokenizer-model DIR --decoder-model DIR
"""

from __future__ import annotations

import argparse
import time

import common as C

SIDES = ("in-process", "grpc", "stack")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-audio-tokens", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    args = ap.parse_args()
    from glmv_gateway.client import GatewayClient

    print(f"# bench_turn: profile {args.profile}, device {args.device}/{args.dtype}; "
          f"{C.machine_info(args.device)}")
    models = C.prepare_models(args)
    audio, rate, wav = C.question_audio()
    stack = C.start_stack(models, args)
    results: dict[str, list[C.TurnTiming]] = {s: [] for s in SIDES}
    try:
        inproc = C.InProcess(models, args.device, args.dtype)
        direct = C.GrpcDirect({c: stack.addr(c) for c in ("tokenizer", "lm", "decoder")})
        client = GatewayClient(stack.gateway_url, stack.api_key)
        run = {
            "in-process": lambda s: inproc.turn(audio, rate, s),
            "grpc": lambda s: direct.turn(audio, rate, s),
            "stack": lambda s: C.stack_turn(client, wav, s),
        }
        t_start = time.perf_counter()
        for i in range(-args.warmup, args.turns):
            s = C.TurnSettings(seed=max(i, 0) % 7, max_audio_tokens=args.max_audio_tokens,
                               max_new_tokens=args.max_new_tokens)
            order = SIDES[i % 3:] + SIDES[: i % 3]
            for side in order:
                r = run[side](s)
                if i >= 0:
                    results[side].append(r)
        wall = time.perf_counter() - t_start
        client.close()
        direct.close()
        inproc.close()
    finally:
        stack.stop()
    report(results, args, wall)


def report(results: dict[str, list[C.TurnTiming]], args: argparse.Namespace, wall: float) -> None:
    rows = []
    for side, rs in results.items():
        ok = [r for r in rs if r.error is None]
        rows.append([
            side, len(ok), len(rs) - len(ok),
            C.med([r.ttft_ms for r in ok]), C.pct([r.ttft_ms for r in ok], 95),
            C.med([r.ttfa_ms for r in ok]), C.pct([r.ttfa_ms for r in ok], 95),
            C.med([r.total_ms for r in ok]), C.pct([r.total_ms for r in ok], 95),
            C.med([r.rtf for r in ok]), C.pct([r.rtf for r in ok], 95),
            C.med([r.audio_s for r in ok]), C.med([r.audio_tokens for r in ok]),
            C.med([r.lm_tps for r in ok]),
        ])
    C.table(f"turn latency, {args.profile} profile ({args.turns} turns per side, interleaved, {wall:.0f} s)",
            ["side", "ok", "err", "TTFT p50 ms", "p95", "TTFA p50 ms", "p95", "total p50 ms", "p95",
             "RTF p50", "p95", "audio s", "audio tok", "LM tok/s"], rows)
    base = results["in-process"]
    rows = []
    for side in ("grpc", "stack"):
        pairs = [(a.ttfa_ms, b.ttfa_ms) for a, b in zip(base, results[side], strict=True)
                 if a.ttfa_ms and b.ttfa_ms]
        tot = [(a.total_ms, b.total_ms) for a, b in zip(base, results[side], strict=True)]
        rows.append([
            f"{side} / in-process",
            C.med([b for _, b in pairs]) / C.med([a for a, _ in pairs]),
            C.med([b / a for a, b in pairs]),
            C.med([b for _, b in pairs]) - C.med([a for a, _ in pairs]),
            C.med([b for _, b in tot]) / C.med([a for a, _ in tot]),
        ])
    C.table("overhead of the services (target: stack TTFA ≤ 1.10 × in-process)",
            ["ratio", "TTFA (ratio of p50s)", "TTFA (p50 of per-turn ratios)", "TTFA Δ p50 ms",
             "total (ratio of p50s)"], rows, digits=2)
    stages = ["tokenize_ms", "lm_ttft_ms", "first_chunk_flow_ms", "first_chunk_hift_ms", "gw_ttfa_ms"]
    rows = []
    for side, rs in results.items():
        rows.append([side] + [C.med([r.stages.get(k) for r in rs]) for k in stages]
                    + [C.med([r.ttfa_ms for r in rs])])
    C.table("where the time to first audio goes (p50 ms; services' own timing fields; '-' = not reported)",
            ["side", "tokenize (client-side until tokens)", "LM TTFT (engine)", "1st chunk flow",
             "1st chunk vocoder", "gateway TTFA (server-side)", "TTFA (client)"], rows)


if __name__ == "__main__":
    main()
