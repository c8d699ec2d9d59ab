"""Torch/OpenMP threads per service process: torch's default vs N threads (a cost found with bench_turn).

With torch's default intra-op thread count (one per core in every process) the tokenizer, LM and
decoder processes of a small machine run 3 × cores busy-waiting OpenMP threads while the LM and the
decoder work at the same time. Since this was measured, the local stack gives each service
``GLMV_<C>_TORCH_THREADS = max(1, cores // 3)``. Two stacks on the same checkpoints, one with torch's
default (``TORCH_THREADS=0``) and one with N threads, run the same turns interleaved.

    .venv/bin/python benchmarks/bench_threads.py [--turns 10] [--threads 1]
"""

from __future__ import annotations

import argparse

import common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from glmv_gateway.client import GatewayClient

    print(f"# bench_threads: profile {args.profile}, device {args.device}; {C.machine_info(args.device)}")
    models = C.prepare_models(args)
    _, _, wav = C.question_audio()
    cfg = {"torch default": C.threads_env(0), f"{args.threads} thread(s)": C.threads_env(args.threads)}
    stacks = {}
    res: dict[str, list[C.TurnTiming]] = {k: [] for k in cfg}
    try:
        for i, (k, env) in enumerate(cfg.items()):
            stacks[k] = C.start_stack(models, args, db=args.redis_db + i, extra=env)
        clients = {k: GatewayClient(s.gateway_url, s.api_key) for k, s in stacks.items()}
        for i in range(-1, args.turns):
            for k in (list(cfg) if i % 2 == 0 else list(cfg)[::-1]):
                r = C.stack_turn(clients[k], wav, C.TurnSettings(seed=max(i, 0) % 7))
                if i >= 0:
                    res[k].append(r)
        for c in clients.values():
            c.close()
    finally:
        for s in stacks.values():
            s.stop()
    rows = [[k, C.med([r.ttfa_ms for r in rs]), C.pct([r.ttfa_ms for r in rs], 95),
             C.med([r.total_ms for r in rs]), C.pct([r.total_ms for r in rs], 95),
             C.med([r.rtf for r in rs]), C.med([r.lm_tps for r in rs])] for k, rs in res.items()]
    C.table(f"service threads, full stack, {args.profile} profile ({args.turns} turns each, interleaved)",
            ["threads per process", "TTFA p50 ms", "p95", "total p50 ms", "p95", "RTF p50", "LM tok/s p50"],
            rows)


if __name__ == "__main__":
    main()
