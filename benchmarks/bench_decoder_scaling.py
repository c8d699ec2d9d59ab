"""Decoder cost as the reply grows, with and without the prompt window (issue 5).

For each reply length L (5 ... 60 s of speech) a random token sequence is streamed through
``DecoderStream`` with our chunk schedule (10, 25, 50, 100, 150, 200, 200, ...), once with the service's
default conditioning window and once with no window (the reference behaviour: every chunk is
conditioned on the whole reply so far). Window / no window alternate per length.

Figures: whole-stream RTF (compute / audio), cost of the last chunk per second of its audio, the
prompt tokens the last chunk was conditioned on, and the cost of one 25-token chunk after L s of history
(``bench_decoder.chunk_cost``: a stream primed with L s of state). Target: RTF(60 s) ≤ 1.2 × RTF(5 s).

    .venv/bin/python benchmarks/bench_decoder_scaling.py [--profile realsize] [--lengths 5,10,20,30,60]
"""

from __future__ import annotations

import argparse
import time

import bench_decoder as BD
import common as C

from glmv_decoder.streaming import DEFAULT_PROMPT_WINDOW_TOKENS, DecoderStream


def stream(dec: object, toks: list[int], window: int) -> dict[str, float]:
    s = DecoderStream(dec, prompt_window_tokens=window)  # type: ignore[arg-type]
    sizes = C.chunk_sizes(C.OURS)
    t0 = time.perf_counter()
    i, samples = 0, 0
    while i < len(toks):
        n = next(sizes)
        part = toks[i:i + n]
        i += n
        samples += len(s.finish(part) if i >= len(toks) else s.push(part))
    total = time.perf_counter() - t0
    last = s.timings[-1]
    return {"rtf": total / (samples / 22050), "total_s": total,
            "last_ms_per_s": last.total_ms / max(last.emitted_samples / 22050, 1e-9),
            "last_prompt": last.prompt_tokens, "chunks": len(s.timings)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)
    ap.add_argument("--lengths", default="5,10,20,30,60", type=lambda v: [float(x) for x in v.split(",")])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from glmv_decoder.checkpoint import load_decoder

    print(f"# bench_decoder_scaling: profile {args.profile}, device {args.device}; "
          f"{C.machine_info(args.device)}")
    models = C.prepare_models(args)
    dec = load_decoder(models["decoder"], args.device, args.dtype)
    vocab = int(dec.config.flow.vocab_size)
    stream(dec, BD.tokens(30, vocab), DEFAULT_PROMPT_WINDOW_TOKENS)  # warm-up
    windows = {f"{DEFAULT_PROMPT_WINDOW_TOKENS} tok": DEFAULT_PROMPT_WINDOW_TOKENS, "none": 0}
    res: dict[tuple[float, str], list[dict[str, float]]] = {}
    cost: dict[tuple[float, str], float] = {}
    for k, length in enumerate(args.lengths):
        toks = BD.tokens(round(length * 12.5), vocab, seed=k)
        order = list(windows) if k % 2 == 0 else list(windows)[::-1]
        for _ in range(args.repeats):
            for name in order:
                res.setdefault((length, name), []).append(stream(dec, toks, windows[name]))
        for name in order:
            cost[(length, name)] = BD.chunk_cost(dec, length, windows[name], 25, vocab, args.repeats) * 1000
    rows = []
    for (length, name), rs in res.items():
        rows.append([length, name, C.med([r["rtf"] for r in rs]), C.med([r["total_s"] for r in rs]),
                     int(rs[0]["chunks"]), C.med([r["last_ms_per_s"] for r in rs]), int(rs[0]["last_prompt"]),
                     cost[(length, name)]])
    C.table(f"decoder scaling, {args.profile} profile (streamed with schedule 10,25,50,100,150,200; "
            f"median of {args.repeats})",
            ["reply s", "window", "RTF", "compute s", "chunks", "last chunk ms per audio s",
             "last chunk prompt tok", "25-tok chunk after L s, ms"], rows, digits=3)
    rows = []
    first, last = args.lengths[0], args.lengths[-1]
    for name in windows:
        a = C.med([r["rtf"] for r in res[(first, name)]])
        b = C.med([r["rtf"] for r in res[(last, name)]])
        rows.append([name, f"{last:g} s / {first:g} s", b / a, cost[(last, name)] / cost[(first, name)]])
    C.table("growth (target with the window: RTF ratio ≤ 1.2)",
            ["window", "lengths", "RTF ratio", "25-tok chunk cost ratio"], rows, digits=2)


if __name__ == "__main__":
    main()
