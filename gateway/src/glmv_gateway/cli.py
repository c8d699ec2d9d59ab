"""``glmv``: run the gateway, the local stack, the demo turn, and a chat client."""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
import time
from pathlib import Path

from glmv_gateway.client import GatewayClient, GatewayError, TurnResult
from glmv_gateway.stack import COMPONENTS, DEV_API_KEY, LocalStack, StackError, make_dev_models

REPO_SAMPLE = Path(__file__).resolve().parents[3] / "samples" / "question.wav"


def _content_type(path: Path) -> str:
    guessed = mimetypes.guess_type(path.name)[0]
    return {"audio/x-wav": "audio/wav"}.get(guessed or "", guessed or "audio/wav")


def print_turn(client: GatewayClient, session_id: str, *, audio: Path | None, text: str | None) -> TurnResult:
    """Stream one turn: text as it arrives, then timings."""

    def show(event: dict) -> None:
        if event["type"] == "text.delta":
            print(event["text"], end="", flush=True)
        elif event["type"] == "error":
            print(f"\n[error from {event.get('component')}: {event.get('message')}]", end="")

    kwargs = (
        {"text": text}
        if text is not None
        else {"audio": audio.read_bytes(), "content_type": _content_type(audio)}
    )
    print("assistant: ", end="", flush=True)
    result = client.turn(session_id, on_event=show, **kwargs)
    print()
    t = result.done.get("timings", {})
    u = result.done.get("usage", {})
    print(
        f"end: {result.done.get('end_reason')}  text tokens: {u.get('text_tokens')}  audio tokens: "
        f"{u.get('audio_tokens')}  prompt tokens: {u.get('prompt_tokens')}"
    )
    print(
        f"latency: first text {t.get('time_to_first_text_ms')} ms, "
        f"first audio {t.get('time_to_first_audio_ms')} ms, "
        f"total {t.get('total_ms')} ms, reply audio {t.get('audio_ms')} ms, RTF {t.get('rtf')}"
    )
    return result


def cmd_chat(args: argparse.Namespace) -> int:
    with GatewayClient(args.url, args.api_key) as client:
        session_id = args.session or client.create_session()["id"]
        print(f"session: {session_id}")
        result = print_turn(client, session_id, audio=args.audio, text=args.text)
        if args.out and result.audio.size:
            result.write_wav(args.out)
            print(
                f"reply audio: {args.out} "
                f"({result.audio.size / result.sample_rate:.2f} s at {result.sample_rate} Hz)"
            )
        return 1 if result.error else 0


def cmd_demo(args: argparse.Namespace) -> int:
    models_root = Path(args.models)
    print(f"dev checkpoints: {models_root} (tiny random weights: the reply is noise, not speech)")
    t0 = time.perf_counter()
    models = make_dev_models(models_root)
    print(f"starting redis (if needed), tokenizer, lm, decoder and gateway ... (logs in {args.logs})")
    stack = LocalStack(models=models, log_dir=Path(args.logs))
    with stack:
        print(f"stack ready in {time.perf_counter() - t0:.1f} s at {stack.gateway_url}")
        with GatewayClient(stack.gateway_url, stack.api_key) as client:
            session_id = client.create_session()["id"]
            print(f"session: {session_id}; user audio: {args.audio}")
            result = print_turn(client, session_id, audio=Path(args.audio), text=None)
            if result.error:
                return 1
            result.write_wav(args.out)
            seconds = result.audio.size / max(result.sample_rate, 1)
            print(f"reply audio written to {args.out} ({seconds:.2f} s at {result.sample_rate} Hz)")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    models = {c: Path(getattr(args, f"{c}_model") or Path(args.models) / c) for c in COMPONENTS}
    if not any(getattr(args, f"{c}_model") for c in COMPONENTS):
        make_dev_models(Path(args.models))
    ports = {
        "gateway": args.port,
        "tokenizer": args.port_base,
        "lm": args.port_base + 1,
        "decoder": args.port_base + 2,
        "audiosocket": args.audiosocket_port,
    }
    stack = LocalStack(models=models, ports=ports, log_dir=Path(args.logs))
    stack.start()
    print(f"gateway: {stack.gateway_url} (API key: {stack.api_key}); docs at {stack.gateway_url}/docs")
    print(f"AudioSocket (Asterisk): 127.0.0.1:{stack.ports['audiosocket']}")
    print("Ctrl-C stops the stack")
    try:
        while all(p.poll() is None for p in stack.procs.values()):
            time.sleep(0.5)
        print("a process exited; stopping the stack", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def cmd_make_dev(args: argparse.Namespace) -> int:
    dirs = make_dev_models(Path(args.out), seed=args.seed, force=args.force)
    for component, path in dirs.items():
        print(f"{component}: {path}")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from glmv_gateway.api.app import main

    main()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from glmv_gateway.jobs.worker import main

    main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "gateway", help="serve the HTTP/WebSocket API (settings: GLMV_GATEWAY_* env)"
    ).set_defaults(func=cmd_gateway)

    sub.add_parser(
        "worker", help="run a Celery batch-job worker (settings: GLMV_GATEWAY_* env)"
    ).set_defaults(func=cmd_worker)

    models = sub.add_parser("models", help="model checkpoints").add_subparsers(
        dest="models_cmd", required=True
    )
    make_dev = models.add_parser("make-dev", help="write tiny random checkpoints in the published layouts")
    make_dev.add_argument("--out", default=".models")
    make_dev.add_argument("--seed", type=int, default=0)
    make_dev.add_argument("--force", action="store_true")
    make_dev.set_defaults(func=cmd_make_dev)

    stack = sub.add_parser("stack", help="local stack as processes").add_subparsers(
        dest="stack_cmd", required=True
    )
    up = stack.add_parser("up", help="start redis (if needed), the services and the gateway; Ctrl-C stops")
    up.add_argument("--models", default=".models", help="root of dev checkpoints (made if missing)")
    for component in COMPONENTS:
        up.add_argument(f"--{component}-model", help=f"{component} checkpoint directory (published layout)")
    up.add_argument("--port", type=int, default=8080)
    up.add_argument("--port-base", type=int, default=50051)
    up.add_argument("--audiosocket-port", type=int, default=9092, help="Asterisk AudioSocket TCP port")
    up.add_argument("--logs", default=".run/logs")
    up.set_defaults(func=cmd_stack)

    demo = sub.add_parser("demo", help="one spoken turn through the whole local stack on dev checkpoints")
    demo.add_argument("--audio", default=str(REPO_SAMPLE))
    demo.add_argument("--out", default="reply.wav")
    demo.add_argument("--models", default=".models")
    demo.add_argument("--logs", default=".run/logs")
    demo.set_defaults(func=cmd_demo)

    chat = sub.add_parser("chat", help="speak or type one turn to a running gateway")
    chat.add_argument("--url", default=os.environ.get("GLMV_URL", "http://127.0.0.1:8080"))
    chat.add_argument("--api-key", default=os.environ.get("GLMV_API_KEY", DEV_API_KEY))
    group = chat.add_mutually_exclusive_group(required=True)
    group.add_argument("--audio", type=Path)
    group.add_argument("--text")
    chat.add_argument("--out", help="write the reply audio to this WAV file")
    chat.add_argument("--session", help="continue this session (multi-turn)")
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StackError, GatewayError) as exc:
        print(f"glmv: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
