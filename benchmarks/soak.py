"""Soak: N sessions loop spoken turns against the stack for T minutes (not part of the tests).

Reports errors, time to first audio (p50/p95 per minute), and the RSS and open file descriptors of
every stack process at the start (after the first turns), after one minute, at the middle and at
the end. Starts a local stack on dev checkpoints unless ``--url`` names a running gateway (then only
turn figures are measured).

The target run (a quiet machine):  python benchmarks/soak.py --sessions 16 --minutes 10
A short run on a busy machine:     python benchmarks/soak.py --sessions 4 --minutes 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "question.wav"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MB, open fds) of a live process."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, url: str, api_key: str, sessions: int, minutes: float, settings: dict) -> None:
        self.url, self.api_key = url, api_key
        self.sessions, self.seconds = sessions, minutes * 60
        self.settings = settings
        self.turns: list[tuple[float, float | None, str | None]] = []  # (t, ttfa ms, error)
        self.lock = threading.Lock()
        self.started = 0.0

    def session_loop(self, index: int, stop: threading.Event) -> None:
        from glmv_gateway.client import GatewayClient

        wav = SAMPLE.read_bytes()
        with GatewayClient(self.url, self.api_key, timeout=300) as client:
            session_id = client.create_session(**self.settings, seed=index)["id"]
            while not stop.is_set():
                t0 = time.perf_counter()
                first_audio: float | None = None
                error: str | None = None
                try:
                    for event in client.stream_turn(session_id, audio=wav, content_type="audio/wav"):
                        if event["type"] == "audio.delta" and first_audio is None:
                            first_audio = (time.perf_counter() - t0) * 1000
                        elif event["type"] == "error":
                            error = f"{event.get('component')}: {event.get('message')}"
                except Exception as exc:  # a failed turn is a soak error, the loop goes on
                    error = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.turns.append((time.perf_counter() - self.started, first_audio, error))

    def run(self, pids: dict[str, int]) -> dict:
        stop = threading.Event()
        self.started = time.perf_counter()
        threads = [
            threading.Thread(target=self.session_loop, args=(i, stop), daemon=True)
            for i in range(self.sessions)
        ]
        for thread in threads:
            thread.start()
        marks = {"start": 20.0, "1 min": 60.0, "middle": self.seconds / 2, "end": self.seconds}
        samples: dict[str, dict[str, tuple[float, int]]] = {}
        for name, at in sorted(marks.items(), key=lambda item: item[1]):
            time.sleep(max(0.0, at - (time.perf_counter() - self.started)))
            samples[name] = {proc: proc_stats(pid) for proc, pid in pids.items()}
        stop.set()
        for thread in threads:
            thread.join(timeout=600)
        return samples


def markdown(soak: Soak, samples: dict, args: argparse.Namespace) -> str:
    turns = soak.turns
    errors = [t for t in turns if t[2]]
    lines = [
        f"# Soak: {args.sessions} sessions × {args.minutes:g} min ({dt.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({args.note}). Stack: dev checkpoints, "
        f"malloc trim {'on' if args.malloc_trim else 'off'}. Turn: samples/question.wav, "
        f"max_new_tokens {args.max_new_tokens}, max_audio_tokens {args.max_audio_tokens}.",
        f"Command: `python benchmarks/soak.py --sessions {args.sessions} --minutes {args.minutes:g}"
        f"{' --malloc-trim' if args.malloc_trim else ''}`",
        "",
        f"Turns: {len(turns)}, errors: {len(errors)}"
        + (f" (first: {errors[0][2]})" if errors else ""),
        "",
        "| minute | turns | TTFA p50 ms | TTFA p95 ms |",
        "|---|---|---|---|",
    ]
    for minute in range(int(args.minutes + 0.999)):
        ttfa = [t[1] for t in turns if minute * 60 <= t[0] < (minute + 1) * 60 and t[1] is not None]
        lines.append(f"| {minute + 1} | {len(ttfa)} | {pct(ttfa, 50):.0f} | {pct(ttfa, 95):.0f} |")
    if samples and next(iter(samples.values())):
        names = list(samples)
        header = " | ".join(f"RSS MB / fds {n}" for n in names)
        lines += ["", f"| process | {header} | RSS after 1 min |"]
        lines.append("|---" * (len(names) + 2) + "|")
        for proc in samples[names[0]]:
            cells = [f"{samples[n][proc][0]:.0f} / {samples[n][proc][1]}" for n in names]
            base, end = samples["1 min"][proc][0], samples["end"][proc][0]
            lines.append(f"| {proc} | " + " | ".join(cells) + f" | {100 * (end - base) / base:+.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--url", help="a running gateway (default: start a local dev stack)")
    ap.add_argument("--api-key", default="dev-key")
    ap.add_argument("--models", default=".models")
    ap.add_argument("--redis-url", default=os.environ.get("GLMV_SOAK_REDIS_URL", "redis://127.0.0.1:6379/11"))
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--max-audio-tokens", type=int, default=60)
    ap.add_argument(
        "--malloc-trim", action="store_true", help="services trim the heap every 5 s (default: never)"
    )
    ap.add_argument("--note", default="shared machine")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak.md"))
    args = ap.parse_args()
    settings = {"max_new_tokens": args.max_new_tokens, "max_audio_tokens": args.max_audio_tokens}
    sys.path.insert(0, str(REPO))
    stack = None
    pids: dict[str, int] = {}
    url = args.url
    if url is None:
        from glmv_gateway.stack import LocalStack, make_dev_models

        env = {"OMP_NUM_THREADS": "1"}
        trim = "5" if args.malloc_trim else "0"  # 0: the allocator's own behaviour, for comparison
        env.update({f"GLMV_{c.upper()}_MALLOC_TRIM_S": trim for c in ("tokenizer", "lm", "decoder")})
        stack = LocalStack(
            models=make_dev_models(Path(args.models)),
            redis_url=args.redis_url,
            log_dir=REPO / ".run" / "soak-logs",
            extra_env=env,
            gateway_env={"GLMV_GATEWAY_MAX_TURNS_PER_KEY": str(max(8, args.sessions))},
            with_worker=False,
        )
        stack.start(timeout=300)
        url = stack.gateway_url
        pids = {name: proc.pid for name, proc in stack.procs.items()}
    soak = Soak(url, args.api_key, args.sessions, args.minutes, settings)
    try:
        samples = soak.run(pids)
    finally:
        if stack is not None:
            stack.stop()
    report = markdown(soak, samples, args)
    print(report)
    Path(args.out).write_text(report)
    durations = [t[1] for t in soak.turns if t[1] is not None]
    print(f"mean TTFA {statistics.fmean(durations):.0f} ms" if durations else "no audio", file=sys.stderr)
    return 1 if any(t[2] for t in soak.turns) else 0


if __name__ == "__main__":
    raise SystemExit(main())
