"""``glmv-decoder``: make-dev (random checkpoint), synthesize (tokens → audio file), serve (gRPC)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from glmv_common.errors import GlmvError, InvalidRequest
from glmv_common.runtime import add_serve_arguments


def _make_dev(args: argparse.Namespace) -> int:
    from .devmodel import write_dev_checkpoint

    out = write_dev_checkpoint(args.out, seed=args.seed, codebook_size=args.codebook_size, size=args.size)
    print(out)
    return 0


def _read_tokens(path: Path) -> list[int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: cannot read a JSON array of speech tokens: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        raise InvalidRequest(f"{path}: expected a JSON array of integer speech token ids")
    if not data:
        raise InvalidRequest(f"{path}: no speech tokens")
    return data


def _schedule(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InvalidRequest(f"--schedule must be comma-separated token counts, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise InvalidRequest(f"--schedule sizes must be >= 1, got {text!r}")
    return sizes


def synthesize(
    decoder: object, tokens: list[int], schedule: list[int] | None, seed: int, prompt_window_tokens: int
) -> np.ndarray:
    """Decode ``tokens`` one-shot, or stream them in chunks of ``schedule`` (the last size repeats; the
    last chunk is the final one)."""
    from .streaming import DecoderStream, one_shot

    if schedule is None:
        return one_shot(decoder, tokens, seed=seed)  # type: ignore[arg-type]
    stream = DecoderStream(decoder, seed=seed, prompt_window_tokens=prompt_window_tokens)  # type: ignore[arg-type]
    chunks, i, k = [], 0, 0
    while i < len(tokens):
        size = schedule[min(k, len(schedule) - 1)]
        k += 1
        chunks.append(tokens[i : i + size])
        i += size
    # The last chunk is decoded as the final one (nothing withheld), in one flow + one vocoder call, as the
    # reference does for its last chunk; the service does the same with the tokens sent in Finish.
    parts = [stream.push(c) for c in chunks[:-1]]
    parts.append(stream.finish(chunks[-1] if chunks else []))
    return np.concatenate(parts)


def _synthesize(args: argparse.Namespace) -> int:
    from glmv_common.audio import encode_wav, resample

    from .checkpoint import load_decoder

    out = Path(args.out)
    if out.suffix.lower() not in (".wav", ".npy"):
        raise InvalidRequest(f"--out must end in .wav or .npy, got {out.name}")
    tokens = _read_tokens(Path(args.tokens))
    schedule = _schedule(args.schedule)
    decoder = load_decoder(args.model, args.device, args.dtype)
    audio = synthesize(decoder, tokens, schedule, args.seed, args.prompt_window_tokens)
    if args.sample_rate != 22050:
        audio = resample(audio, 22050, args.sample_rate)
    if out.suffix.lower() == ".npy":
        np.save(out, audio.astype(np.float32))
    else:
        out.write_bytes(encode_wav(audio, args.sample_rate))
    print(
        json.dumps(
            {
                "out": str(out),
                "tokens": len(tokens),
                "samples": len(audio),
                "sample_rate": args.sample_rate,
                "seconds": round(len(audio) / args.sample_rate, 3),
            }
        )
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from glmv_common.runtime import serve_from_args

    from .service import DecoderService, DecoderSettings

    return serve_from_args(DecoderSettings, DecoderService, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmv-decoder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("make-dev", help="write a random decoder checkpoint in the published layout")
    dev.add_argument("--out", required=True, help="output directory (config.yaml, flow.pt, hift.pt)")
    dev.add_argument("--seed", type=int, default=0)
    dev.add_argument(
        "--codebook-size", type=int, default=None, help="flow vocabulary (default: dev 64, realsize 16384)"
    )
    dev.add_argument("--size", choices=["dev", "realsize"], default="dev")
    dev.set_defaults(func=_make_dev)

    syn = sub.add_parser("synthesize", help="decode speech tokens (JSON array) to a .wav or .npy file")
    syn.add_argument("--model", required=True, help="decoder directory (config.yaml, flow.pt, hift.pt)")
    syn.add_argument("--tokens", required=True, help="JSON file: array of speech token ids")
    syn.add_argument("--out", required=True, help="output .wav (PCM16) or .npy (float32 samples)")
    syn.add_argument(
        "--schedule",
        default=None,
        help="stream in chunks of these sizes, e.g. 10,25,50,100,150,200 (last repeats); "
        "default: one-shot decode",
    )
    syn.add_argument("--sample-rate", type=int, default=22050, choices=[8000, 16000, 22050, 24000, 48000])
    syn.add_argument("--seed", type=int, default=42, help="flow noise seed (reference: 42)")
    syn.add_argument(
        "--prompt-window-tokens",
        type=int,
        default=None,
        help="streaming conditioning window; 0 = whole history (default: service default)",
    )
    syn.add_argument("--device", default="cpu")
    syn.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    syn.set_defaults(func=_synthesize)

    srv = sub.add_parser("serve", help="run the gRPC service (settings from GLMV_DECODER_* variables)")
    add_serve_arguments(srv, "decoder")
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt_window_tokens", 0) is None:
        from .streaming import DEFAULT_PROMPT_WINDOW_TOKENS

        args.prompt_window_tokens = DEFAULT_PROMPT_WINDOW_TOKENS
    try:
        return int(args.func(args))
    except GlmvError as exc:
        print(f"glmv-decoder: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
