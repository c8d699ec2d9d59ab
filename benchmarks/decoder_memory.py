"""Is the decoder's RSS growth under load a leak or the allocator keeping freed memory?

Decodes many streams of varying length in one process (what the decoder service does under a soak)
and prints the RSS after every block, then after ``malloc_trim(0)``; the same with a trim after each
stream. A leak keeps growing and survives the trim; allocator caching levels off and a trim gives
the pages back. Python-level growth is checked with tracemalloc.

    python benchmarks/decoder_memory.py --streams 300
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import tracemalloc
from pathlib import Path

import torch

from glmv_common.runtime import malloc_trim
from glmv_decoder.checkpoint import load_decoder
from glmv_decoder.devmodel import write_dev_checkpoint
from glmv_decoder.streaming import DecoderStream

SCHEDULE = [10, 25, 50, 100, 150, 200]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode(dec, n_tokens: int, vocab: int, rng: random.Random) -> int:
    toks = [rng.randrange(vocab) for _ in range(n_tokens)]
    stream = DecoderStream(dec)
    samples, i, k = 0, 0, 0
    while i < len(toks):
        size = SCHEDULE[min(k, len(SCHEDULE) - 1)]
        samples += len(stream.push(toks[i : i + size]))
        i, k = i + size, k + 1
    return samples + len(stream.finish())


def run(dec, vocab: int, streams: int, block: int, trim_each: bool) -> list[tuple[int, float]]:
    rng = random.Random(0)
    points = [(0, rss_mb())]
    for n in range(1, streams + 1):
        decode(dec, rng.randrange(20, 400), vocab, rng)
        if trim_each:
            malloc_trim()
        if n % block == 0:
            points.append((n, rss_mb()))
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--block", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dec = load_decoder(write_dev_checkpoint(Path(tempfile.mkdtemp()) / "dev", seed=0), "cpu")
    vocab = dec.config.flow.vocab_size if hasattr(dec.config.flow, "vocab_size") else 16384
    decode(dec, 50, vocab, random.Random(1))  # warm-up
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for trim_each in (False, True):
        points = run(dec, vocab, args.streams, args.block, trim_each)
        gc.collect()
        trimmed = malloc_trim()
        after_trim = rss_mb()
        label = "trim after each stream" if trim_each else "no trim"
        series = ", ".join(f"{n}: {mb:.0f}" for n, mb in points)
        print(f"{label}: RSS MB after N streams {{{series}}}; after a final malloc_trim({trimmed}): "
              f"{after_trim:.0f}")
    growth = tracemalloc.take_snapshot().compare_to(before, "filename")
    python_kb = sum(stat.size_diff for stat in growth) / 1024
    print(f"Python heap growth over all streams (tracemalloc): {python_kb:.0f} KiB")


if __name__ == "__main__":
    main()
