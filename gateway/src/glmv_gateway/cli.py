"""``glmv``: run the gateway, the local stack, the demo turn, and a chat client."""

from __future__ import annotations

import argparse
import mimetypes
import os
import signal
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


class StackStopped(Exception):
    """SIGTERM or SIGHUP reached ``glmv stack up``."""


def _stop_on(signum: int, frame: object) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # one stop at a time: stop() must not be interrupted
    raise StackStopped(signal.Signals(signum).name)


def cmd_stack(args: argparse.Namespace) -> int:
    models = {c: Path(getattr(args, f"{c}_model") or Path(args.models) / c) for c in COMPONENTS}
    if not any(getattr(args, f"{c}_model") for c in COMPONENTS):
        make_dev_models(Path(args.models))
    ports = {"gateway": args.port}
    if args.port_base:  # 0: any free ports
        ports.update(tokenizer=args.port_base, lm=args.port_base + 1, decoder=args.port_base + 2)
    audiosocket = 9092 if args.audiosocket_port is None and args.port_base else args.audiosocket_port
    if audiosocket:  # with --port-base 0 (any free ports) the AudioSocket port is free too unless given
        ports["audiosocket"] = audiosocket
    stack = LocalStack(
        models=models, ports=ports, log_dir=Path(args.logs), redis_url=args.redis_url, supervise=True
    )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on)
    try:
        stack.start()
        print(f"gateway: {stack.gateway_url} (API key: {stack.api_key}); docs at {stack.gateway_url}/docs")
        page = f"http://localhost:{stack.ports['gateway']}/demo/"
        print(f"talk page: {page}")
        print(f"AudioSocket (Asterisk): 127.0.0.1:{stack.ports['audiosocket']}")
        if args.open:
            import webbrowser

            if not webbrowser.open(page):
                print(f"no browser could be started here: open {page} yourself", file=sys.stderr)
        print("a process that exits is restarted; Ctrl-C (or SIGTERM / SIGHUP) stops the stack", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except StackStopped as stopped:
        print(f"{stopped}: stopping the stack", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()


def cmd_make_dev(args: argparse.Namespace) -> int:
    dirs = make_dev_models(Path(args.out), seed=args.seed, force=args.force)
    for component, path in dirs.items():
        print(f"{component}: {path}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from glmv_gateway.download import DownloadError, DownloadSettings, download_component, settings_lines

    overrides = {
        k: v
        for k, v in {
            "endpoint": args.endpoint,
            "revision": args.revision,
            "tokenizer_repo": args.tokenizer_repo,
            "lm_repo": args.lm_repo,
            "decoder_repo": args.decoder_repo,
        }.items()
        if v is not None
    }
    unknown = sorted(set(args.components) - set(COMPONENTS))
    if unknown:
        print(
            f"glmv: unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}",
            file=sys.stderr,
        )
        return 2
    settings = DownloadSettings(**overrides)
    out = Path(args.out)
    done = []
    try:
        for component in args.components or COMPONENTS:
            print(f"{component}: fetching {getattr(settings, f'{component}_repo')}@{settings.revision}")
            got = download_component(component, out, settings, progress=not args.quiet)
            print(f"{component}: {got.path} (commit {got.commit}) — layout check passed")
            done.append(got)
    except DownloadError as exc:
        print(f"glmv: {exc}", file=sys.stderr)
        return 1
    print("settings that point the stack at these checkpoints:")
    for line in settings_lines(done, out):
        print(f"  {line}")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from glmv_common.logs import setup_logging
    from glmv_gateway.rollout import Rollout, RolloutError, RolloutPlan

    setup_logging("rollout", fmt=args.log_format)
    try:
        import docker
    except ImportError:
        print("glmv: glmv rollout needs the Docker SDK: pip install 'glmv-gateway[ops]'", file=sys.stderr)
        return 2
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"glmv: --env {item!r}: use NAME=VALUE", file=sys.stderr)
            return 2
        env[key] = value
    try:
        plan = RolloutPlan(
            component=args.component,
            version=args.version,
            image=args.image,
            model_dir=Path(args.model_dir),
            registry_file=Path(args.versions_file),
            network=args.network,
            container_name=args.name or "",
            lm_addr=args.lm_addr,
            canary_weight=args.canary_weight,
            canary_s=args.canary_seconds,
            health_timeout_s=args.health_timeout,
            drain_timeout_s=args.drain_timeout,
            env=env,
        )
        client = docker.DockerClient(base_url=args.docker_host) if args.docker_host else docker.from_env()
        Rollout(plan, client).run()
    except RolloutError as exc:
        print(f"glmv: rollout failed (rolled back): {exc}", file=sys.stderr)
        return 1
    except docker.errors.DockerException as exc:
        print(f"glmv: cannot reach the container engine: {exc}", file=sys.stderr)
        return 2
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
    download = models.add_parser(
        "download",
        help="fetch the published checkpoints from the Hugging Face hub (or a mirror), resumably, "
        "only the files each service reads, then check each directory",
    )
    download.add_argument("--out", default="models", help="root: <out>/tokenizer, <out>/lm, <out>/decoder")
    download.add_argument(
        "components", nargs="*", metavar="COMPONENT", help="tokenizer, lm, decoder (default: all three)"
    )
    download.add_argument("--endpoint", help="hub endpoint or mirror URL (env GLMV_MODELS_ENDPOINT)")
    download.add_argument("--revision", help="branch, tag or commit (env GLMV_MODELS_REVISION)")
    for component in COMPONENTS:
        download.add_argument(f"--{component}-repo", help=f"{component} repository id")
    download.add_argument("--quiet", action="store_true", help="no progress bars")
    download.set_defaults(func=cmd_download)

    rollout = sub.add_parser(
        "rollout",
        help="single host: start a new tokenizer/decoder version's container, check it, shift traffic "
        "in the versions file (canary, then all), drain and remove the old one; rolls back on failure",
    )
    rollout.add_argument("component", choices=["decoder", "tokenizer"])
    rollout.add_argument("--version", required=True, help="the new version's id in the registry (e.g. v2)")
    rollout.add_argument("--image", required=True, help="its image (e.g. glmvoice/decoder:0.2.0)")
    rollout.add_argument("--model-dir", required=True, help="its checkpoint directory on this host")
    rollout.add_argument("--versions-file", required=True, help="the gateways' GLMV_GATEWAY_VERSIONS_FILE")
    rollout.add_argument("--network", required=True, help="the stack's container network")
    rollout.add_argument("--name", help="container name (default glmvoice-<component>-<version>)")
    rollout.add_argument("--lm-addr", default="lm:50052", help="the LM, as named on the network")
    rollout.add_argument("--canary-weight", type=float, default=0.1, help="share of new sessions first")
    rollout.add_argument("--canary-seconds", type=float, default=30.0, help="how long the canary runs")
    rollout.add_argument("--health-timeout", type=float, default=300.0, help="seconds to reach SERVING")
    rollout.add_argument("--drain-timeout", type=float, default=120.0, help="seconds for old streams to end")
    rollout.add_argument("--env", action="append", default=[], help="NAME=VALUE for the new container")
    rollout.add_argument("--docker-host", help="engine API URL (default: DOCKER_HOST)")
    rollout.add_argument("--log-format", choices=["text", "json"], default="text")
    rollout.set_defaults(func=cmd_rollout)

    stack = sub.add_parser("stack", help="local stack as processes").add_subparsers(
        dest="stack_cmd", required=True
    )
    up = stack.add_parser("up", help="start redis (if needed), the services and the gateway; Ctrl-C stops")
    up.add_argument("--models", default=".models", help="root of dev checkpoints (made if missing)")
    for component in COMPONENTS:
        up.add_argument(f"--{component}-model", help=f"{component} checkpoint directory (published layout)")
    up.add_argument("--port", type=int, default=8080)
    up.add_argument("--port-base", type=int, default=50051, help="first of three gRPC ports (0: any free)")
    up.add_argument(
        "--redis-url",
        default=os.environ.get("GLMV_GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="sessions' Redis (a redis-server is started there if none answers)",
    )
    up.add_argument(
        "--audiosocket-port", type=int, default=None, help="Asterisk AudioSocket TCP port (default 9092)"
    )
    up.add_argument("--logs", default=".run/logs")
    up.add_argument("--open", action="store_true", help="open the browser talk page when the stack is up")
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
