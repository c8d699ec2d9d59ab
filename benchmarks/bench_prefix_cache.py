"""Prefix cache: time to first token of a conversation's later turns, cache off vs on.

Each turn's prompt is the previous prompt, the previous reply (its ids) and ``--new`` tokens of new
user input, as the gateway sends them. Off, every turn prefills the whole conversation again; on,
the LM reuses the keys and values it kept from the previous turn and prefills only the new part.
Both sides run the same conversations (same seeds, greedy), alternating, ``--conversations`` times.

    .venv/bin/python benchmarks/bench_prefix_cache.py --service-threads 1   # LM 'mid', CPU
    .venv/bin/python benchmarks/bench_prefix_cache.py --lm-model DIR --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import common as C  # type: ignore[import-not-found]
import torch

from glmv_lm.engine import DoneEvent, EngineConfig, GenerationEngine, TokenEvent, TokenSpec
from glmv_lm.sampling import SamplingParams


def conversation(loaded, tok, spec: TokenSpec, cache_tokens: int, seed: int, args) -> list[tuple[float, int, int]]:  # type: ignore[no-untyped-def]  # noqa: E501
    """Per turn: (TTFT ms, prompt tokens, cached tokens)."""
    engine = GenerationEngine(
        loaded.model,
        spec,
        tok.incremental_decoder,
        EngineConfig(max_batch_size=2, max_context=loaded.max_context, prefix_cache_tokens=cache_tokens),
    )
    engine.start()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, spec.audio_offset, (args.first,), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=args.reply)
    out = []
    try:
        for _ in range(args.turns):
            ids: list[int] = []
            done: list[DoneEvent] = []

            def sink(event: object, ids: list[int] = ids, done: list[DoneEvent] = done) -> None:
                if isinstance(event, TokenEvent):
                    ids.append(event.token_id)
                elif isinstance(event, DoneEvent):
                    done.append(event)

            assert engine.submit(prompt, params, sink).finished.wait(600)
            out.append((done[0].time_to_first_token_ms, done[0].prompt_tokens, done[0].cached_tokens))
            prompt = prompt + ids + torch.randint(0, spec.audio_offset, (args.new,), generator=g).tolist()
    finally:
        engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)  # --lm-model, --device, --dtype, --service-threads (the rest is unused)
    ap.add_argument("--size", default="mid", help="random LM to write (devmodel size) unless --lm-model")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--first", type=int, default=300, help="tokens of the first prompt")
    ap.add_argument("--new", type=int, default=60, help="new user tokens per turn")
    ap.add_argument("--reply", type=int, default=100, help="reply tokens per turn")
    ap.add_argument("--conversations", type=int, default=3)
    args = ap.parse_args()
    print(f"# bench_prefix_cache: {C.machine_info(args.device)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        loaded, tok, spec, label = C.engine_lm_from_args(args, Path(tmp))
        budget = (args.first + args.turns * (args.new + args.reply)) * 2
        runs: dict[str, list[list[tuple[float, int, int]]]] = {"off": [], "on": []}
        for k in range(args.conversations):
            for side in ("off", "on") if k % 2 == 0 else ("on", "off"):
                runs[side].append(conversation(loaded, tok, spec, budget if side == "on" else 0, k, args))
    rows = []
    for t in range(args.turns):
        off = statistics.median(r[t][0] for r in runs["off"])
        on = statistics.median(r[t][0] for r in runs["on"])
        rows.append([t + 1, runs["on"][0][t][1], runs["on"][0][t][2], off, on, on / off])
    C.table(
        f"{label}: TTFT per turn of a growing conversation (median of {args.conversations}; "
        f"first prompt {args.first}, +{args.reply} reply +{args.new} new per turn)",
        ["turn", "prompt tok", "cached tok", "TTFT off ms", "TTFT on ms", "on / off"],
        rows,
        digits=2,
    )


if __name__ == "__main__":
    main()
