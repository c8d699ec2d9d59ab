"""Speech decoder benchmark: one-shot vs streaming RTF, time to first chunk, per-chunk cost vs history
length with and without the conditioning window, and concurrent streams.

    python benchmarks/bench_decoder.py                  # dev-size weights (seconds)
    python benchmarks/bench_decoder.py --size realsize  # published sizes, random weights (minutes on CPU)
    python benchmarks/bench_decoder.py --model DIR      # a real checkpoint directory
    python benchmarks/bench_decoder.py --quick          # fewer points

RTF = compute seconds / audio seconds (< 1 is faster than real time). Time to first chunk (TTFC) counts
from the first push of tokens that yields audio, i.e. excludes waiting for the LM to produce them.
Per-chunk cost vs history: a stream is primed with H seconds of already-decoded history (random mel
frames of the right shape, so no need to decode the history itself) and the next 25-token chunk is timed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from glmv_decoder.streaming import (
    DEFAULT_PROMPT_WINDOW_TOKENS,
    MEL_OVERLAP,
    DecoderStream,
    _Carry,
    _History,
    feat_len,
    one_shot,
)

RATE = 22050
TOKEN_RATE = 12.5
SCHEDULE = [10, 25, 50, 100, 150, 200]


def build(size: str, model: str | None, device: str) -> Any:
    if model:
        from glmv_decoder.checkpoint import load_decoder

        return load_decoder(model, device)
    from glmv_decoder.checkpoint import load_decoder
    from glmv_decoder.devmodel import dev_config, write_dev_checkpoint

    if size == "dev":
        tmp = Path(tempfile.mkdtemp(prefix="glmv-bench-"))
        return load_decoder(write_dev_checkpoint(tmp / "dev", seed=0), device)
    # realsize: published dimensions with random weights, built in memory (no 530 MB write)
    from glmv_decoder.flow import FlowModel
    from glmv_decoder.hift import HiFTGenerator

    cfg = dev_config("realsize")
    torch.manual_seed(0)
    flow = FlowModel(cfg.flow).to(device).eval()
    hift = HiFTGenerator(cfg.hift).to(device).eval()
    return SimpleNamespace(config=cfg, flow=flow, hift=hift)


def tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def secs(n_tokens: int) -> float:
    return 256 * feat_len(n_tokens) / RATE


def run_stream(dec: Any, toks: list[int], schedule: list[int], window: int) -> tuple[float, float, int]:
    """Returns (time to first audio, total compute seconds, samples)."""
    stream = DecoderStream(dec, prompt_window_tokens=window)
    t0 = time.perf_counter()
    first = None
    total, i, k = 0, 0, 0
    while i < len(toks):
        size = schedule[min(k, len(schedule) - 1)]
        k += 1
        out = stream.push(toks[i:i + size])
        i += size
        if len(out) and first is None:
            first = time.perf_counter() - t0
        total += len(out)
    total += len(stream.finish())
    return first or 0.0, time.perf_counter() - t0, total


def prime(stream: DecoderStream, history_tokens: int, vocab: int) -> None:
    """Give ``stream`` the state it would have after decoding ``history_tokens`` (random mel content)."""
    dev = stream.device
    frames = feat_len(history_tokens)
    keep = frames - MEL_OVERLAP
    stream._history = _History(
        tokens=torch.tensor([tokens(history_tokens, vocab, 1)], dtype=torch.long, device=dev),
        token_start=0, mel=torch.randn(1, 80, keep, device=dev) - 5,
    )
    stream._carry = _Carry(overlap=torch.randn(1, 80, MEL_OVERLAP, device=dev) - 5,
                           cache_mel=torch.randn(1, 80, 1, device=dev) - 5,
                           cache_source=torch.zeros(1, 1, 256, device=dev))
    stream.tokens_decoded = stream.tokens_received = history_tokens
    stream.frames_decoded = frames
    if stream.prompt_window_tokens:  # apply the same trimming a real stream would have done
        stream._append_history(torch.zeros(1, 0, dtype=torch.long, device=dev),
                               torch.zeros(1, 80, 0, device=dev), final=False)


def chunk_cost(dec: Any, history_s: float, window: int, chunk: int, vocab: int, repeats: int) -> float:
    hist = round(history_s * TOKEN_RATE)
    times = []
    for _ in range(repeats):
        stream = DecoderStream(dec, prompt_window_tokens=window)
        prime(stream, hist, vocab)
        t0 = time.perf_counter()
        stream.push(tokens(chunk, vocab, 2))
        times.append(time.perf_counter() - t0)
        stream.close()
    return min(times)  # the least-disturbed run: robust to other load on the machine


def concurrent(dec: Any, n_streams: int, n_tokens: int, vocab: int) -> tuple[float, float]:
    """n streams in threads, same schedule; returns (wall seconds, aggregate RTF = wall / total audio)."""
    audio = [0] * n_streams

    def worker(i: int) -> None:
        audio[i] = run_stream(dec, tokens(n_tokens, vocab, 10 + i), SCHEDULE, DEFAULT_PROMPT_WINDOW_TOKENS)[2]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return wall, wall / (sum(audio) / RATE)


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    print(" | ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in cells[1:]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["dev", "realsize"], default="dev")
    ap.add_argument("--model", default=None, help="benchmark a checkpoint directory instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument("--quick", action="store_true", help="fewer points, one repeat")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dec = build(args.size, args.model, args.device)
    vocab = int(dec.config.flow.vocab_size)
    real = args.size == "realsize" or args.model is not None
    print(f"decoder benchmark: {'model ' + args.model if args.model else args.size} on {args.device}, "
          f"torch threads {torch.get_num_threads()}, default window {DEFAULT_PROMPT_WINDOW_TOKENS} tokens")
    one_shot(dec, tokens(20, vocab))  # warm-up

    # 1. one-shot vs streaming
    lengths = [63, 125] if (args.quick or real) else [63, 125, 250]
    rows = []
    for n in lengths:
        toks = tokens(n, vocab)
        t0 = time.perf_counter()
        one_shot(dec, toks)
        dt = time.perf_counter() - t0
        rows.append(["one-shot", f"{secs(n):.1f}", "-", dt, dt, dt / secs(n)])
        for window in (DEFAULT_PROMPT_WINDOW_TOKENS, 0):
            first, total, _ = run_stream(dec, toks, SCHEDULE, window)
            rows.append([f"stream {','.join(map(str, SCHEDULE))}", f"{secs(n):.1f}", window or "none", first,
                         total, total / secs(n)])
    table("one-shot vs streaming", ["mode", "audio s", "window", "TTFC s", "total s", "RTF"], rows)

    # 2. per-chunk cost vs history length
    hist_points = [5, 10, 20, 30, 60]
    if real:
        hist_points = [5, 10, 20] if args.quick else [5, 10, 20, 30]
    repeats = 1 if (args.quick or real) else 3
    chunk = 25
    rows = []
    for h in hist_points:
        with_w = chunk_cost(dec, h, DEFAULT_PROMPT_WINDOW_TOKENS, chunk, vocab, repeats)
        without = chunk_cost(dec, h, 0, chunk, vocab, repeats)
        rows.append([h, with_w, with_w / secs(chunk), without, without / secs(chunk)])
    if real:  # the window keeps long histories affordable: show them for the windowed path only
        for h in ([60] if args.quick else [60, 120]):
            with_w = chunk_cost(dec, h, DEFAULT_PROMPT_WINDOW_TOKENS, chunk, vocab, repeats)
            rows.append([h, with_w, with_w / secs(chunk), "skipped", "-"])
    table(f"cost of one {chunk}-token chunk ({secs(chunk):.2f} s audio) after H s of history",
          ["history s", f"window={DEFAULT_PROMPT_WINDOW_TOKENS} tok: s", "RTF", "no window: s", "RTF"], rows)

    # 3. concurrent streams
    n_tok = 63 if (args.quick or real) else 125
    rows = []
    for n in ([1, 4] if real else [1, 4, 8]):
        wall, rtf = concurrent(dec, n, n_tok, vocab)
        rows.append([n, f"{secs(n_tok):.1f}", wall, rtf])
    table("concurrent streams (threads sharing one model)",
          ["streams", "audio s each", "wall s", "aggregate RTF"], rows)


if __name__ == "__main__":
    main()
