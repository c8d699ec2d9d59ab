"""Batched vs unbatched decoding on one device (GPU check; runs on CPU too, slowly at realsize).

    python benchmarks/gpu_decoder_parity.py --device cuda [--size realsize] [--dtype bfloat16]

Streams with mixed lengths, schedules, windows and seeds are stepped together through ``run_chunks``
(one batched flow call and one batched vocoder call per step) and, separately, one by one. Prints the
largest PCM difference per stream and whether the sample counts agree; exits 1 when a stream differs by
more than 2e-3 (float32) or its length differs.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoder import build

from glmv_decoder.streaming import DecoderStream, run_chunks

# (seed, window, schedule, tokens, last chunk goes with finish)
STREAMS = [(42, 50, [10, 25, 50], 85, True), (7, 0, [6, 1, 30], 44, False), (42, 10, [25], 100, True),
           (3, 50, [12, 12], 24, False), (5, 20, [40], 40, True), (11, 50, [25, 50], 150, True)]


def chunks_of(schedule: list[int], total: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    ids = [rng.randrange(vocab) for _ in range(total)]
    out, i, k = [], 0, 0
    while i < total:
        size = schedule[min(k, len(schedule) - 1)]
        out.append(ids[i : i + size])
        i, k = i + size, k + 1
    return out


def messages(vocab: int) -> list[list[tuple[list[int], bool]]]:
    out = []
    for seed, _w, sch, n, fin in STREAMS:
        ch = chunks_of(sch, n, vocab, seed + 100)
        msgs = [(c, False) for c in (ch[:-1] if fin else ch)]
        out.append([*msgs, (ch[-1] if fin else [], True)])
    return out


def decode(dec, batched: bool) -> list[np.ndarray]:
    steps = messages(int(dec.config.flow.vocab_size))
    streams = [DecoderStream(dec, seed=s, prompt_window_tokens=w) for s, w, *_ in STREAMS]
    got: list[list[np.ndarray]] = [[] for _ in STREAMS]
    for k in range(max(len(s) for s in steps)):
        plans, owners = [], []
        for i, st in enumerate(streams):
            if k < len(steps[i]):
                chunk, final = steps[i][k]
                st.accept(chunk)
                plan = st.plan_chunk(final)
                if plan is not None:
                    plans.append(plan)
                    owners.append(i)
        outs = run_chunks(dec, plans) if batched else [run_chunks(dec, [p])[0] for p in plans]
        for i, audio in zip(owners, outs, strict=True):
            got[i].append(audio)
    return [np.concatenate(g) if g else np.zeros(0, np.float32) for g in got]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["dev", "realsize"], default="realsize")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", help="flow dtype (the vocoder stays float32)")
    args = ap.parse_args()
    dec = build(args.size, args.model, args.device)
    if args.dtype != "float32":
        dec.flow.to(getattr(torch, args.dtype))
    tol = 2e-3 if args.dtype == "float32" else 5e-2
    ref, out = decode(dec, batched=False), decode(dec, batched=True)
    ok = True
    for (seed, w, sch, n, fin), a, b in zip(STREAMS, ref, out, strict=True):
        d = float(np.abs(a - b).max()) if len(a) and len(a) == len(b) else float("inf")
        ok &= len(a) == len(b) and d <= tol
        print(f"stream seed={seed} window={w} schedule={sch} tokens={n} finish-with-last={fin}: "
              f"samples {len(a)}/{len(b)} max|Δ PCM|={d:.2e}")
    verdict = "PARITY OK" if ok else f"PARITY FAILED (tol {tol})"
    print(f"{args.size} {args.device} flow {args.dtype}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
