#!/usr/bin/env python
"""LM parity: our native-GLM loader vs the reference ChatGLM remote code, fp32 on CPU.

Run with the project venv; the reference half re-runs this file under a separate interpreter
(a scratch venv with ``transformers==4.44.1``) that imports ``modeling_chatglm.py`` /
``configuration_chatglm.py`` from ``--ref-src`` (a checkout outside the repo; no reference code
lives here)::

    .venv/bin/python scripts/parity/lm_parity.py \\
        --ref-python /work/scratch/lm/venv/bin/python --ref-src /work/scratch/lm/ref \\
        [--model DIR | --make-dev DIR [--size dev|mid] [--seed 0]]

Compares full-sequence logits of several prompts (max |Δ|), the reference's cached
prefill + one-step decode against ours, and greedy continuations (must be identical).
Prints a JSON report; exit status 1 if a check fails.
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

import numpy as np

TOL = 1e-4


def make_prompts(vocab: int, n_tokens_real: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = [1, 7, 33, 120]
    prompts = [rng.integers(0, n_tokens_real, size=n).tolist() for n in lengths]
    return prompts


# ------------------------------------------------------------------------------------------------ ref


def _import_ref_package(ref_src: str, name: str = "chatglm_ref") -> str:
    """Import the directory ``ref_src`` as a package (its files use relative imports)."""
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
    import torch
    from safetensors.torch import load_file

    pkg = _import_ref_package(ref_src)
    ChatGLMConfig = importlib.import_module(f"{pkg}.configuration_chatglm").ChatGLMConfig
    ChatGLMForConditionalGeneration = importlib.import_module(
        f"{pkg}.modeling_chatglm"
    ).ChatGLMForConditionalGeneration

    spec = json.loads(Path(job).read_text())
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw.pop("auto_map", None)
    cfg = ChatGLMConfig(**raw)
    cfg.torch_dtype = torch.float32
    model = ChatGLMForConditionalGeneration(cfg, empty_init=False).eval()
    index = json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(Path(model_dir) / shard)))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise SystemExit(f"reference load: missing {missing} unexpected {unexpected}")
    results: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for i, ids in enumerate(spec["prompts"]):
            x = torch.tensor([ids])
            pos = torch.arange(len(ids))[None]
            logits = model(input_ids=x, position_ids=pos, use_cache=False).logits[0]
            results[f"logits_{i}"] = logits.float().numpy()
            # cached path: prefill all but the last token, then one decode step with the cache
            if len(ids) > 1:
                pre = model(input_ids=x[:, :-1], position_ids=pos[:, :-1], use_cache=True)
                step = model(
                    input_ids=x[:, -1:],
                    position_ids=pos[:, -1:],
                    past_key_values=pre.past_key_values,
                    use_cache=True,
                )
                results[f"step_{i}"] = step.logits[0, -1].float().numpy()
            gen = model.generate(
                input_ids=x,
                position_ids=pos,
                attention_mask=torch.ones_like(x),
                max_new_tokens=spec["max_new_tokens"],
                do_sample=False,
                eos_token_id=spec["eos"],
                pad_token_id=spec["pad"],
            )
            results[f"greedy_{i}"] = gen[0, len(ids) :].numpy()
    np.savez(out, **results)


# ------------------------------------------------------------------------------------------------ ours


def run_ours(model_dir: str, spec: dict) -> dict[str, np.ndarray]:
    import torch

    from glmv_lm.checkpoint import load_model
    from glmv_lm.cli import simple_generate

    loaded = load_model(model_dir, device="cpu", dtype="float32")
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for i, ids in enumerate(spec["prompts"]):
            x = torch.tensor([ids])
            out[f"logits_{i}"] = loaded.model(input_ids=x, use_cache=False).logits[0].float().numpy()
            greedy = simple_generate(loaded.model, ids, spec["max_new_tokens"], spec["eos"])
            out[f"greedy_{i}"] = np.array(greedy, dtype=np.int64)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["main", "ref"], default="main")
    ap.add_argument("--ref-python", help="interpreter of the reference venv (transformers==4.44.1)")
    ap.add_argument(
        "--ref-src", required=True, help="directory holding modeling_chatglm.py, configuration_chatglm.py"
    )
    ap.add_argument("--model", help="checkpoint directory in the ChatGLM layout")
    ap.add_argument("--make-dev", help="write a dev checkpoint here first")
    ap.add_argument("--size", default="dev")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--job")
    ap.add_argument("--out")
    args = ap.parse_args()

    if args.role == "ref":
        run_reference(args.ref_src, args.model, args.job, args.out)
        return 0

    if args.make_dev:
        from glmv_lm.devmodel import write_dev_checkpoint

        write_dev_checkpoint(args.make_dev, seed=args.seed, size=args.size)
        args.model = args.make_dev
    if not args.model or not args.ref_python:
        ap.error("--model (or --make-dev) and --ref-python are required")
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    vocab = int(cfg["padded_vocab_size"])
    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    spec = {
        "prompts": make_prompts(vocab, vocab, args.seed),
        "max_new_tokens": args.max_new_tokens,
        "eos": eos,
        "pad": cfg.get("pad_token_id", eos[0]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps(spec))
        ref_out = Path(tmp) / "ref.npz"
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
                str(job),
                "--out",
                str(ref_out),
            ],
            check=True,
        )
        ref = dict(np.load(ref_out))
    ours = run_ours(args.model, spec)
    report: dict = {"model": args.model, "prompts": [len(p) for p in spec["prompts"]], "checks": []}
    ok = True
    for i, ids in enumerate(spec["prompts"]):
        d = float(np.abs(ref[f"logits_{i}"] - ours[f"logits_{i}"]).max())
        entry = {
            "prompt_len": len(ids),
            "max_abs_logit_diff": d,
            "logit_scale": float(np.abs(ref[f"logits_{i}"]).max()),
        }
        if f"step_{i}" in ref:
            entry["ref_cached_step_vs_ours_max_abs_diff"] = float(
                np.abs(ref[f"step_{i}"] - ours[f"logits_{i}"][-1]).max()
            )
        rg, og = ref[f"greedy_{i}"].tolist(), ours[f"greedy_{i}"].tolist()
        entry["greedy_identical"] = rg == og
        entry["greedy_len"] = len(og)
        if not entry["greedy_identical"]:
            entry["greedy_ref"], entry["greedy_ours"] = rg, og
        ok &= d <= TOL and entry["greedy_identical"]
        report["checks"].append(entry)
    report["pass"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
