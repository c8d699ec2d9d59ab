"""``glmv-lm``: make-dev, generate, score, info, serve.

* ``glmv-lm make-dev --out DIR [--seed 0] [--codebook-size 64] [--size dev|mid]``
* ``glmv-lm generate --model DIR --ids 1,2,3 [--max-new-tokens N] [--temperature 0]`` → ``{"ids": [...]}``
  (raw ids in and out, no template, no tokenizer files needed); ``--prompt-json FILE`` renders a
  structured conversation with the chat template first.
* ``glmv-lm score --model DIR --ids 1,2,3 --out logits.npy`` → float32 ``[len(ids), vocab]`` logits of
  one fp32 forward pass.
* ``glmv-lm info --model DIR`` → what the loader found (layout, sizes, special ids, fingerprint).
* ``glmv-lm serve`` → the gRPC service (settings from ``GLMV_LM_*`` environment variables).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from glmv_common.errors import GlmvError
from glmv_common.runtime import add_serve_arguments


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise SystemExit(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise SystemExit("--ids is empty")
    return ids


def _check_ids(ids: list[int], vocab: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise SystemExit(f"id {bad[0]} outside the model's vocabulary 0..{vocab - 1}")


@torch.inference_mode()
def simple_generate(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    eos_ids: list[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[int]:
    """One sequence, KV-cached: greedy when ``temperature == 0``, else temperature/top-k/top-p sampling.

    The completion includes the stop token when one is produced (like the reference server).
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    out: list[int] = []
    inp = torch.tensor([prompt], device=device)
    past = None
    for _ in range(max_new_tokens):
        res = model(input_ids=inp, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[0, -1].float()
        if temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                cum = torch.softmax(sorted_logits, -1).cumsum(-1)
                remove = cum - torch.softmax(sorted_logits, -1) >= top_p
                logits = logits.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(nxt)
        if nxt in eos_ids:
            break
        inp = torch.tensor([[nxt]], device=device)
    return out


def _conversation_from_json(data: dict[str, Any]) -> Any:
    from glmv_lm.template import Conversation, Style, Turn

    turns = []
    for t in data.get("turns", []):
        turns.append(
            Turn(role=t.get("role"), text=t.get("text"), audio=t.get("audio"), generated=t.get("generated"))
        )
    style = Style(**data["style"]) if data.get("style") else None
    return Conversation(turns=turns, mode=data.get("mode", "audio"), style=style)


def cmd_make_dev(args: argparse.Namespace) -> int:
    from glmv_lm.devmodel import write_dev_checkpoint

    out = write_dev_checkpoint(
        args.out, seed=args.seed, codebook_size=args.codebook_size, size=args.size, dtype=args.dtype
    )
    print(
        json.dumps(
            {"out": str(out), "size": args.size, "seed": args.seed, "codebook_size": args.codebook_size}
        )
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from glmv_lm.checkpoint import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context)
    result: dict[str, Any] = {}
    tok = None
    if args.prompt_json:
        from glmv_lm.template import render_prompt
        from glmv_lm.text_tokenizer import GlmTextTokenizer

        tok = GlmTextTokenizer.from_dir(args.model)
        conv = _conversation_from_json(json.loads(Path(args.prompt_json).read_text(encoding="utf-8")))
        budget = loaded.max_context - args.max_new_tokens
        rendered = render_prompt(conv, tok, max_prompt_tokens=max(budget, 1))
        prompt = rendered.ids
        result["prompt_ids"] = prompt
        result["dropped_turns"] = rendered.dropped_turns
    else:
        prompt = _parse_ids(args.ids)
    _check_ids(prompt, loaded.vocab_size)
    max_new = min(args.max_new_tokens, loaded.max_context - len(prompt))
    if max_new <= 0:
        raise SystemExit(
            f"prompt of {len(prompt)} tokens leaves no room in the {loaded.max_context}-token window"
        )
    ids = simple_generate(
        loaded.model,
        prompt,
        max_new,
        loaded.eos_token_ids,
        args.temperature,
        args.top_p,
        args.top_k,
        args.seed,
    )
    result = {"ids": ids, **result}
    if tok is not None:
        result["text"] = tok.decode([i for i in ids if not tok.is_audio(i)])
        result["audio_tokens"] = [i - tok.audio_offset for i in ids if tok.is_audio(i)]
    print(json.dumps(result, ensure_ascii=False))
    return 0


@torch.inference_mode()
def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from glmv_lm.checkpoint import load_model

    loaded = load_model(args.model, device=args.device, dtype="float32", max_context=args.max_context)
    ids = _parse_ids(args.ids)
    _check_ids(ids, loaded.vocab_size)
    logits = loaded.model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False).logits[0]
    np.save(args.out, logits.float().cpu().numpy().astype(np.float32))
    print(json.dumps({"out": args.out, "shape": list(logits.shape)}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from glmv_lm.checkpoint import load_model
    from glmv_lm.text_tokenizer import GlmTextTokenizer

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    info: dict[str, Any] = {
        "model_id": loaded.model_id,
        "layout": loaded.layout,
        "vocab_size": loaded.vocab_size,
        "max_context": loaded.max_context,
        "eos_token_ids": loaded.eos_token_ids,
        "num_parameters": loaded.num_parameters,
        "fingerprint": loaded.fingerprint,
    }
    if GlmTextTokenizer.has_files(args.model):
        info["tokenizer"] = GlmTextTokenizer.from_dir(args.model).describe()
    print(json.dumps(info))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from glmv_common.runtime import serve_from_args
    from glmv_lm.service import LmService, LmSettings

    return serve_from_args(LmSettings, LmService, args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmv-lm", description="GLM-4-Voice LM: dev checkpoints, offline runs, serving"
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    mk = sub.add_parser("make-dev", help="write a tiny random LM + tokenizer in the published layout")
    mk.add_argument("--out", required=True)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--codebook-size", type=int, default=64)
    mk.add_argument("--size", choices=["dev", "mid"], default="dev")
    mk.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    mk.set_defaults(func=cmd_make_dev)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, help="checkpoint directory")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--max-context", type=int, default=None)

    g = sub.add_parser("generate", help="raw ids (or a structured conversation) in, generated ids out")
    model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated prompt ids (used verbatim)")
    src.add_argument(
        "--prompt-json", help="a JSON conversation {mode, turns: [{role, text|audio|generated}], style}"
    )
    g.add_argument("--dtype", default="float32")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("score", help="fp32 logits of one forward pass, saved as .npy [len(ids), vocab]")
    model_args(s)
    s.add_argument("--ids", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_score)

    i = sub.add_parser("info", help="load a checkpoint and describe it")
    model_args(i)
    i.add_argument("--dtype", default="float32")
    i.set_defaults(func=cmd_info)

    sv = sub.add_parser("serve", help="run the gRPC service (settings from GLMV_LM_* env)")
    add_serve_arguments(sv, "lm")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GlmvError as exc:
        print(f"glmv-lm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
