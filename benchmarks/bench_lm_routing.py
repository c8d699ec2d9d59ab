"""LM routing with two replicas: prefix-cache hits of a conversation's later turns, spread vs session-affine.

Two LM service processes (``glmv-lm serve``, prefix cache on) on the same checkpoint. ``--conversations``
conversations of ``--turns`` text turns each run interleaved (every conversation's turn 1 in a
shuffled order, then every turn 2, ...), each turn's prompt being the whole conversation so far, as
the gateway sends it.

* ``spread`` (before): one gRPC channel over both replicas with the ``round_robin`` policy, which is
  what the gateway did with a headless-service target: consecutive turns land on either replica.
* ``affine`` (after): ``ServiceClients(lm_addrs=[a, b])``: rendezvous hashing on the session id,
  every turn of a conversation on the replica that holds its prefix.

Reported from the LM's own ``GenerateDone``: share of later turns (2..N) that reused a cached prefix,
share of their prompt tokens reused, prompt tokens prefilled per turn, and their median time to
first token. A "history hit" reuses at least the conversation's whole previous prompt: every prompt
shares the system prompt, so any cached token at all would overstate the hits.

    .venv/bin/python benchmarks/bench_lm_routing.py               # dev LM
    .venv/bin/python benchmarks/bench_lm_routing.py --size mid    # LM 'mid': prefill cost shows in TTFT
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import common as C  # type: ignore[import-not-found]
import grpc

from glmv_gateway.clients import ServiceClients
from glmv_gateway.stack import LocalStack, free_port, make_dev_models
from glmv_gateway.versions import CHANNEL_OPTIONS
from glmvoice.v1 import common_pb2, lm_pb2, lm_pb2_grpc

PROMPTS = ["Tell me about the sea.", "Why is that?", "And the mountains?", "Go on.", "Anything else?"]


Row = tuple[int, int, int, float]  # prompt tokens, cached tokens, previous turn's prompt tokens, TTFT ms


async def run(mode: str, addrs: list[str], args: argparse.Namespace, seed: int) -> list[Row]:
    """One row per later turn."""
    if mode == "spread":
        channel = grpc.aio.insecure_channel("ipv4:" + ",".join(addrs), options=CHANNEL_OPTIONS)
        stub = lm_pb2_grpc.LanguageModelStub(channel)

        def generate(request: lm_pb2.GenerateRequest) -> grpc.aio.UnaryStreamCall:
            return stub.Generate(request, timeout=600)

        closer = channel.close
    else:
        clients = ServiceClients("unused:1", addrs[0], "unused:2", lm_addrs=addrs)
        await clients.registry.probe()

        def generate(request: lm_pb2.GenerateRequest) -> grpc.aio.UnaryStreamCall:
            return clients.generate(request, timeout=600)

        closer = clients.close
    histories: dict[str, list[lm_pb2.Turn]] = {
        f"{mode}-{i}-{time.time_ns()}": [] for i in range(args.conversations)
    }
    previous = dict.fromkeys(histories, 0)
    tag = f"{mode} {seed} {time.time_ns() % 100_000}"
    order = list(enumerate(histories.items()))
    rng = random.Random(seed)  # conversations arrive in a different order every turn, the same in both modes
    rows: list[Row] = []
    try:
        for turn in range(args.turns):
            rng.shuffle(order)
            for n, (sid, history) in order:
                history.append(
                    # the tag makes every run's conversations new to both caches (greedy replies
                    # would otherwise repeat the previous run's and hit whatever the routing)
                    lm_pb2.Turn(
                        role=lm_pb2.Turn.ROLE_USER, text=f"{PROMPTS[turn % len(PROMPTS)]} ({tag} {n})"
                    )
                )
                request = lm_pb2.GenerateRequest(
                    mode=lm_pb2.INPUT_MODE_TEXT,
                    turns=history,
                    sampling=lm_pb2.SamplingParams(temperature=0.0, max_new_tokens=args.reply),
                    request_id=f"{sid}-{turn}",
                    session_id=sid,
                )
                ids: list[int] = []
                done = None
                async for msg in generate(request):
                    if msg.HasField("done"):
                        done = msg.done
                    else:
                        ids.append(msg.delta.id)
                assert done is not None
                history.append(
                    lm_pb2.Turn(role=lm_pb2.Turn.ROLE_ASSISTANT, generated=lm_pb2.TokenIds(ids=ids))
                )
                if turn > 0:
                    rows.append(
                        (
                            done.prompt_tokens,
                            done.cached_prompt_tokens,
                            previous[sid],
                            done.time_to_first_token_ms,
                        )
                    )
                previous[sid] = done.prompt_tokens
    finally:
        await closer()
    return rows


def summary(mode: str, rows: list[Row]) -> list[object]:
    """A hit: the turn reused at least the whole previous prompt of its conversation (any prompt
    shares the system prompt with every other, so "some tokens reused" would say little)."""
    hits = sum(1 for r in rows if r[1] >= r[2])
    prompt = sum(r[0] for r in rows)
    cached = sum(r[1] for r in rows)
    return [
        mode,
        len(rows),
        f"{100 * hits / len(rows):.0f} %",
        f"{100 * cached / max(prompt, 1):.0f} %",
        round((prompt - cached) / len(rows), 1),
        statistics.median(r[3] for r in rows),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-model", type=Path, default=None, help="LM checkpoint (default: a generated one)")
    ap.add_argument(
        "--size", default="dev", help="size of the generated LM (glmv_lm.devmodel: dev, mid, ...)"
    )
    ap.add_argument("--models-root", type=Path, default=C.REPO / ".models" / "bench-routing")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--reply", type=int, default=24, help="reply tokens per turn (greedy)")
    ap.add_argument("--rounds", type=int, default=2, help="spread/affine pairs, alternating")
    ap.add_argument("--service-threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args()

    model = args.lm_model or generated_lm(args.models_root, args.size)
    stack = LocalStack(
        models={"lm": model},
        extra_env={**C.threads_env(args.service_threads), "GLMV_LM_LOG_LEVEL": "WARNING"},
        log_dir=C.REPO / ".run" / "bench-logs",
        with_worker=False,
    )
    stack.ports.update(
        {n: free_port() for n in ("tokenizer", "decoder", "tokenizer_metrics", "decoder_metrics")}
    )
    addrs = [stack.start_extra(name, "lm", model) for name in ("lm_a", "lm_b")]
    results: dict[str, list[Row]] = {"spread": [], "affine": []}
    try:
        for addr in addrs:
            wait_serving(addr)
        for round_ in range(args.rounds):
            for mode in ("spread", "affine"):
                results[mode] += asyncio.run(run(mode, addrs, args, seed=round_))
    finally:
        stack.stop()
    text = (
        f"LM routing over two replicas, {args.conversations} conversations x {args.turns} turns "
        f"(reply {args.reply} tokens, greedy), {args.rounds} rounds per mode; {C.machine_info()}; "
        f"model {model.name}\n"
        + C.table(
            "Later turns (2..N) of each conversation",
            [
                "routing",
                "turns",
                "history hits",
                "prompt tokens reused",
                "prefilled / turn",
                "median TTFT ms",
            ],
            [summary(mode, rows) for mode, rows in results.items()],
        )
    )
    if args.out:
        args.out.write_text(text + "\n")


def generated_lm(root: Path, size: str) -> Path:
    if size == "dev":
        return make_dev_models(root)["lm"]
    from glmv_lm.devmodel import write_dev_checkpoint

    out = root / f"lm-{size}"
    if not (out / "config.json").exists():
        write_dev_checkpoint(out, seed=0, size=size)
    return out


def wait_serving(addr: str, timeout: float = 300.0) -> None:
    """Block until the LM at ``addr`` answers GetInfo (its model is loaded)."""

    async def probe() -> bool:
        async with grpc.aio.insecure_channel(addr) as channel:
            try:
                await lm_pb2_grpc.LanguageModelStub(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=5)
                return True
            except grpc.aio.AioRpcError:
                return False

    deadline = time.monotonic() + timeout
    while not asyncio.run(probe()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"LM at {addr} not serving after {timeout:.0f} s")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
