#!/usr/bin/env python
"""Text-tokenizer parity: our GlmTextTokenizer vs the reference ``tokenization_chatglm.py``.

Run with the project venv; the reference half re-runs this file under ``--ref-python`` (a scratch
venv with ``transformers==4.44.1`` and ``tiktoken``) and imports ``tokenization_chatglm.py`` from
``--ref-src`` (outside the repo)::

    .venv/bin/python scripts/parity/lm_tokenizer_parity.py \\
        --ref-python /work/scratch/lm/venv/bin/python --ref-src /work/scratch/lm/ref --model DIR

Checks: encode (with the ``[gMASK]<sop>`` prefix) of assorted strings including special and audio
token strings; the rendered chat template (first turn, text and audio, and a multi-turn history
whose assistant reply round-trips through text) against the reference tokenizing the reference's
prompt string; decode of sequences without ``<|endoftext|>`` (the reference decoder is known to be
wrong on that token; the report shows both outputs for it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STRINGS = [
    "Hello world!",
    "  leading spaces and trailing   ",
    "你好，今天天气怎么样？",
    "Numbers 12345 and 3.14159, can't won't I'LL",
    "Emoji 😀🎉 and combining é naïve",
    "line1\nline2\r\n\n\ttab",
    "<|user|>\nhi<|assistant|>streaming_transcription\n",
    "[gMASK]<sop><|system|>\nsys<|user|>\n<|begin_of_audio|><|audio_0|><|audio_17|><|end_of_audio|>",
    "text<|audio_3|>more<|audio_63|>",
    "<|endoftext|> after eos",
    "",
]


def _import_ref_package(ref_src: str, name: str = "chatglm_ref") -> str:
    init = Path(ref_src) / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, init if init.exists() else None, submodule_search_locations=[ref_src]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)
    return name


def run_reference(ref_src: str, model_dir: str, job: str, out: str) -> None:
    pkg = _import_ref_package(ref_src)
    tok_cls = importlib.import_module(f"{pkg}.tokenization_chatglm").ChatGLM4Tokenizer
    tok = tok_cls.from_pretrained(model_dir)
    spec = json.loads(Path(job).read_text())
    res = {
        "encode": [tok([s])["input_ids"][0] for s in spec["strings"]],
        "prompts": [tok([s])["input_ids"][0] for s in spec["prompt_strings"]],
        "decode": [tok.decode(ids, spaces_between_special_tokens=False) for ids in spec["decode"]],
    }
    Path(out).write_text(json.dumps(res))


def build_job(model_dir: str) -> tuple[dict, dict]:
    from glmv_lm.template import (
        ASSISTANT_OPENING,
        SYSTEM_PROMPT_AUDIO,
        SYSTEM_PROMPT_TEXT,
        Conversation,
        Turn,
        render_prompt,
    )
    from glmv_lm.text_tokenizer import GlmTextTokenizer

    tok = GlmTextTokenizer.from_dir(model_dir)
    reply = [*tok.encode("Sure, here it is.", parse_special=False), tok.audio_id(5), tok.audio_id(6)]
    audio = [0, 17, 63 % tok.audio_count, 2]
    convs = [
        Conversation([Turn("user", text="What's the weather like?")], mode="text"),
        Conversation([Turn("user", audio=audio)], mode="audio"),
        Conversation(
            [
                Turn("user", audio=audio),
                Turn("assistant", generated=reply),
                Turn("user", text="And tomorrow? 明天呢"),
            ],
            mode="audio",
        ),
    ]

    def audio_str(tokens: list[int]) -> str:
        return "<|begin_of_audio|>" + "".join(f"<|audio_{k}|>" for k in tokens) + "<|end_of_audio|>"

    # The reference web demo's prompt strings for the same conversations.
    turn = "<|user|>\n{}<|assistant|>" + ASSISTANT_OPENING
    prompt_strings = [
        f"<|system|>\n{SYSTEM_PROMPT_TEXT}" + turn.format("What's the weather like?"),
        f"<|system|>\n{SYSTEM_PROMPT_AUDIO}" + turn.format(audio_str(audio)),
        (f"<|system|>\n{SYSTEM_PROMPT_AUDIO}" + turn.format(audio_str(audio)) + tok.decode(reply)).strip()
        + turn.format("And tomorrow? 明天呢"),
    ]
    ours_prompts = [render_prompt(c, tok).ids for c in convs]
    decode = [
        tok.encode("Hello 你好 😀", parse_special=False),
        [
            *tok.encode("Hi", parse_special=False),
            tok.audio_id(0),
            tok.audio_id(1),
            *tok.encode("Hi", parse_special=False),
        ],
        [tok.token_id("<|user|>"), *tok.encode("é", parse_special=False), tok.token_id("<|assistant|>")],
        [*tok.encode("Hi", parse_special=False), tok.token_id("<|endoftext|>")],  # reference quirk
    ]
    job = {"strings": STRINGS, "prompt_strings": prompt_strings, "decode": decode}
    ours = {
        "encode": [tok.encode(s, add_prefix=True) for s in STRINGS],
        "prompts": ours_prompts,
        "decode": [tok.decode(ids) for ids in decode],
    }
    return job, ours


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["main", "ref"], default="main")
    ap.add_argument("--ref-python")
    ap.add_argument("--ref-src", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--job")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.role == "ref":
        run_reference(args.ref_src, args.model, args.job, args.out)
        return 0
    job, ours = build_job(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        jp, op = Path(tmp) / "job.json", Path(tmp) / "ref.json"
        jp.write_text(json.dumps(job))
        subprocess.run(
            [
                args.ref_python,
                __file__,
                "--role",
                "ref",
                "--ref-src",
                args.ref_src,
                "--model",
                args.model,
                "--job",
                str(jp),
                "--out",
                str(op),
            ],
            check=True,
        )
        ref = json.loads(op.read_text())
    enc_ok = [a == b for a, b in zip(ref["encode"], ours["encode"], strict=True)]
    prompt_ok = [a == b for a, b in zip(ref["prompts"], ours["prompts"], strict=True)]
    dec_ok = [a == b for a, b in zip(ref["decode"], ours["decode"], strict=True)]
    report = {
        "encode_identical": f"{sum(enc_ok)}/{len(enc_ok)}",
        "template_identical": f"{sum(prompt_ok)}/{len(prompt_ok)}",
        "decode_identical_without_eos": f"{sum(dec_ok[:-1])}/{len(dec_ok) - 1}",
        "decode_with_eos": {"ref": ref["decode"][-1], "ours": ours["decode"][-1]},
        "mismatches": [
            {"what": w, "i": i, "ref": ref[w][i], "ours": ours[w][i]}
            for w, oks in (("encode", enc_ok), ("prompts", prompt_ok), ("decode", dec_ok[:-1]))
            for i, ok in enumerate(oks)
            if not ok
        ],
    }
    ok = all(enc_ok) and all(prompt_ok) and all(dec_ok[:-1])
    report["pass"] = ok
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
