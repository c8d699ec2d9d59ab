"""Run the whole benchmark suite and write the tables to one markdown file.

    .venv/bin/python benchmarks/run_all.py                    # dev profile, ~10 min on 2 cores
    .venv/bin/python benchmarks/run_all.py --profile realsize # much longer on CPU
    .venv/bin/python benchmarks/run_all.py --device cuda --dtype bfloat16 --lm-model DIR \\
        --tokenizer-model DIR --decoder-model DIR --full      # a GPU machine, full-size models

Profile/model arguments are passed to every benchmark. Unless ``--service-threads`` is
given, the suite runs every benchmark but bench_threads with ``--service-threads 1`` on machines
with <= 4 cores (see bench_threads.py: the shipped default oversubscribes small machines).
``--quick`` shrinks the dev run further; ``--full`` uses each benchmark's own defaults (20 turns,
levels up to 16, lengths up to 60 s).
Output: stdout and ``benchmarks/results/<date>-<profile>.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name, script, arguments for the default (dev, ~10 min) run
SUITE = [
    ("service threads (as shipped vs 1)", "bench_threads.py", ["--turns", "8"]),
    ("turn latency + service overhead", "bench_turn.py", ["--turns", "20"]),
    ("chunk schedule", "bench_schedule.py", ["--turns", "8"]),
    ("concurrency", "bench_concurrency.py", ["--levels", "1,2,4,8,16", "--turns", "2"]),
    ("decoder scaling", "bench_decoder_scaling.py", ["--lengths", "5,10,20,30,60", "--repeats", "2"]),
    ("LM chunked prefill", "bench_prefill_chunk.py", ["--repeats", "3"]),
    ("LM prefix cache", "bench_prefix_cache.py", ["--conversations", "3"]),
]
QUICK = {"bench_threads.py": ["--turns", "4"],
         "bench_turn.py": ["--turns", "6"], "bench_schedule.py": ["--turns", "3"],
         "bench_concurrency.py": ["--levels", "1,4,8", "--turns", "1"],
         "bench_decoder_scaling.py": ["--lengths", "5,20,60", "--repeats", "1"],
         "bench_prefill_chunk.py": ["--repeats", "1", "--chunks", "0,512"],
         "bench_prefix_cache.py": ["--conversations", "1", "--turns", "4"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated script names to run")
    ap.add_argument("--out", type=Path, default=None)
    args, passthrough = ap.parse_known_args()
    profile = passthrough[passthrough.index("--profile") + 1] if "--profile" in passthrough else "dev"
    out = args.out or HERE / "results" / f"{dt.date.today().isoformat()}-{profile}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# benchmark suite, profile {profile} ({' '.join(passthrough) or 'defaults'})\n"]
    t_all = time.perf_counter()
    for title, script, extra in SUITE:
        if args.only and script not in args.only.split(","):
            continue
        extra = [] if args.full else (QUICK[script] if args.quick else extra)
        small = (os.cpu_count() or 1) <= 4
        if script != "bench_threads.py" and "--service-threads" not in passthrough and small:
            extra = [*extra, "--service-threads", "1"]
        cmd = [sys.executable, str(HERE / script), *passthrough, *extra]
        print(f"\n## {title}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - t0
        body = proc.stdout
        if proc.returncode != 0:
            body += "\n```\n" + proc.stderr[-3000:] + "\n```"
        print(body, flush=True)
        parts.append(f"\n## {title} ({script}, {took:.0f} s, exit {proc.returncode})\n{body}")
    parts.append(f"\nsuite wall time {time.perf_counter() - t_all:.0f} s\n")
    out.write_text("".join(parts))
    print(f"\nwritten to {out} in {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
