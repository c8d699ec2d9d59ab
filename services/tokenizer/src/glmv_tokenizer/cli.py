"""``glmv-tokenizer``: make-dev, tokenize (offline, JSON lines), serve (gRPC)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glmv_common.errors import GlmvError
from glmv_common.runtime import add_serve_arguments


def _make_dev(args: argparse.Namespace) -> int:
    from .checkpoint import write_dev_checkpoint

    out = write_dev_checkpoint(
        args.out, seed=args.seed, size=args.size, codebook_size=args.codebook_size, layout=args.layout
    )
    print(out)
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from glmv_common.audio import decode_file

    from .tokenizer import SpeechTokenizer, prepare_audio

    tokenizer = SpeechTokenizer.from_dir(args.model, device=args.device, dtype=args.dtype)
    status = 0
    for path in args.audio:
        try:
            samples, rate = decode_file(Path(path).read_bytes())
            tokens = tokenizer.tokenize_batch([prepare_audio(samples, rate, args.max_seconds)])[0]
        except (OSError, GlmvError) as exc:
            print(f"glmv-tokenizer: {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"path": path, "tokens": tokens}), flush=True)
    return status


def _serve(args: argparse.Namespace) -> int:
    from glmv_common.runtime import serve_from_args

    from .service import TokenizerService, TokenizerSettings

    return serve_from_args(TokenizerSettings, TokenizerService, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmv-tokenizer", description="GLM-4-Voice speech tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("make-dev", help="write a random-weight checkpoint in the published layout")
    dev.add_argument("--out", required=True, help="directory to write")
    dev.add_argument("--seed", type=int, default=0)
    dev.add_argument(
        "--size",
        choices=["dev", "realsize"],
        default="dev",
        help="dev: tiny (d_model 64, 2 layers); realsize: published dimensions",
    )
    dev.add_argument(
        "--codebook-size",
        type=int,
        default=None,
        help="codebook entries (default 64 for dev, 16384 for realsize)",
    )
    dev.add_argument(
        "--layout",
        choices=["bare", "training"],
        default="bare",
        help="bare encoder keys (published) or the model.encoder.* training layout",
    )
    dev.set_defaults(func=_make_dev)

    tok = sub.add_parser("tokenize", help="tokenize audio files; one JSON object per line")
    tok.add_argument("--model", required=True, help="checkpoint directory")
    tok.add_argument("--device", default="cpu")
    tok.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    tok.add_argument("--max-seconds", type=float, default=600.0)
    tok.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg)")
    tok.set_defaults(func=_tokenize)

    srv = sub.add_parser("serve", help="run the gRPC service (settings from GLMV_TOKENIZER_* env)")
    add_serve_arguments(srv, "tokenizer")
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GlmvError as exc:
        print(f"glmv-tokenizer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
