"""Parity of glmv_tokenizer against the reference GLM-4-Voice ``speech_tokenizer`` (CPU, fp32).

Contains no reference code. Run with the project venv; it re-runs itself under a separate
reference interpreter (transformers==4.44.1) that imports ``speech_tokenizer.modeling_whisper``
from a checkout given on the command line::

    .venv/bin/python scripts/parity/tokenizer_parity.py \\
        --reference-root /work/scratch/tok/glm4voice --reference-python /work/scratch/tok/venv/bin/python

What it checks, on random-weight checkpoints written by ``glmv-tokenizer make-dev``:
* the reference module's state-dict key set and shapes == the keys our writer stores;
* token ids of several inputs (one > 30 s, one > 60 s, silence, quiet noise, block-boundary lengths):
  ours vs the reference driver called per utterance, with eager and with sdpa attention,
  and vs the reference driver called once with all utterances batched;
* the hidden states entering every encoder layer (max abs difference at real frames);
* config variants: the published (block-causal 200, causal convs), no block size, plain convs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LENGTHS_S = [1.0, 3.3, 4.0, 4.0125, 7.77, 12.345, 31.7, 65.2]


# ---------------------------------------------------------------- reference side (old transformers)
def reference_side(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(args.reference_root).resolve()))
    from speech_tokenizer.configuration_whisper import WhisperVQConfig
    from speech_tokenizer.modeling_whisper import WhisperVQEncoder
    from transformers import WhisperFeatureExtractor

    torch.set_grad_enabled(False)
    inputs = [np.load(p) for p in sorted(Path(args.inputs).glob("*.npy"))]
    model_dir = args.model
    fe = WhisperFeatureExtractor.from_pretrained(model_dir)
    sdpa = WhisperVQEncoder.from_pretrained(model_dir).eval()
    config = WhisperVQConfig.from_pretrained(model_dir)
    eager = WhisperVQEncoder(config).eval()
    eager.load_state_dict(sdpa.state_dict())
    keys = {k: list(v.shape) for k, v in WhisperVQEncoder(config).state_dict().items()}

    def driver(model, utts: list[np.ndarray], hidden: bool = False):
        # the reference driver's steps, 16 kHz input (no resampling), CPU instead of CUDA
        audios, owners = [], []
        for idx, audio in enumerate(utts):
            t = 0
            while t * 16000 < audio.shape[0]:
                audios.append(audio[t * 16000 : (t + 30) * 16000])
                owners.append(idx)
                t += 30
        stride = (
            model.conv1.stride[0] * model.conv2.stride[0] * model.config.pooling_kernel_size * fe.hop_length
        )
        tokens = [[] for _ in utts]
        states = [[] for _ in utts]
        for start in range(0, len(audios), 128):
            feats = fe(
                audios[start : start + 128],
                sampling_rate=16000,
                return_attention_mask=True,
                return_tensors="pt",
                device="cpu",
                padding="longest",
                pad_to_multiple_of=stride,
            )
            out = model(**feats, output_hidden_states=hidden)
            mask = feats.attention_mask[:, :: model.conv1.stride[0] * model.conv2.stride[0]]
            mask = mask[:, :: model.config.pooling_kernel_size]
            for i in range(len(out.quantized_token_ids)):
                tokens[owners[start + i]].extend(out.quantized_token_ids[i][mask[i].bool()].tolist())
                if hidden:
                    valid = feats.attention_mask[i, ::2].bool()
                    states[owners[start + i]].append(
                        [
                            h[i][valid[: h.shape[1]]].numpy().tolist()
                            for h in out.hidden_states[: len(model.layers)]
                        ]
                    )
        return tokens, states

    result = {"keys": keys, "single_eager": [], "single_sdpa": [], "states": []}
    for audio in inputs:
        toks, states = driver(eager, [audio], hidden=args.hidden)
        result["single_eager"].append(toks[0])
        result["states"].append(states[0])
        result["single_sdpa"].append(driver(sdpa, [audio])[0][0])
    result["batched_sdpa"] = driver(sdpa, inputs)[0]
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------- our side
def make_inputs(folder: Path, seed: int) -> list:
    import numpy as np

    from glmv_tokenizer.checkpoint import synthetic_audio

    rng = np.random.default_rng(seed)
    inputs = []
    for i, seconds in enumerate(LENGTHS_S):
        inputs.append(synthetic_audio(seed + 100 + i, seconds))
    inputs.append(np.zeros(int(2.5 * 16000), dtype=np.float32))  # digital silence
    inputs.append((1e-4 * rng.standard_normal(int(5.3 * 16000))).astype(np.float32))  # near silence
    for i, audio in enumerate(inputs):
        np.save(folder / f"{i:03d}.npy", audio)
    return inputs


def our_states(tokenizer, audio) -> list[list]:
    """Inputs of every encoder layer at real frames, per window (hooks on our module)."""
    import torch

    from glmv_tokenizer.features import stack

    result = []
    for window in tokenizer.pipeline.utterance(audio):
        captured: list = []
        hooks = [
            layer.register_forward_pre_hook(lambda m, a, sink=captured: sink.append(a[0][0]))
            for layer in tokenizer.model.layers
        ]
        feats, mask = stack([window])
        with torch.inference_mode():
            tokenizer.model(torch.from_numpy(feats), torch.from_numpy(mask))
        for h in hooks:
            h.remove()
        valid = torch.from_numpy(window.frame_mask[::2]).bool()
        result.append([c[valid[: c.shape[0]]].numpy() for c in captured])
    return result


def variant(base: Path, out: Path, changes: dict) -> Path:
    import shutil

    shutil.copytree(base, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def compare(args: argparse.Namespace) -> int:
    import numpy as np
    from safetensors import safe_open

    from glmv_tokenizer.checkpoint import write_dev_checkpoint
    from glmv_tokenizer.tokenizer import SpeechTokenizer

    work = Path(tempfile.mkdtemp(prefix="tok-parity-"))
    (work / "inputs").mkdir()
    inputs = make_inputs(work / "inputs", args.seed)
    base = write_dev_checkpoint(work / "published", seed=args.seed, codebook_size=args.codebook_size)
    variants = {
        "published (block 200, causal conv)": base,
        "no block size (padding mask)": variant(base, work / "noblock", {"quantize_causal_block_size": None}),
        "plain convs": variant(base, work / "plainconv", {"encoder_causal_convolution": False}),
    }
    failures = 0
    print(f"inputs (s): {[round(len(x) / 16000, 4) for x in inputs]}  seed={args.seed}")
    for name, model_dir in variants.items():
        ref_json = work / f"ref-{model_dir.name}.json"
        cmd = [
            args.reference_python,
            __file__,
            "--side",
            "reference",
            "--reference-root",
            args.reference_root,
            "--model",
            str(model_dir),
            "--inputs",
            str(work / "inputs"),
            "--out",
            str(ref_json),
        ]
        if model_dir == base:
            cmd.append("--hidden")
        subprocess.run(cmd, check=True)
        ref = json.loads(ref_json.read_text())
        tok = SpeechTokenizer.from_dir(model_dir)
        ours = tok.tokenize_batch(inputs)
        print(f"\n== {name}: {model_dir}")
        if model_dir == base:
            with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
                stored = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
            same = stored == ref["keys"]
            failures += not same
            print(f"state-dict keys/shapes equal to the reference module's: {same} ({len(stored)} keys)")
        for mode in ("single_eager", "single_sdpa", "batched_sdpa"):
            total = agree = exact_utts = 0
            for mine, theirs in zip(ours, ref[mode], strict=True):
                n = max(len(mine), len(theirs))
                total += n
                agree += sum(a == b for a, b in zip(mine, theirs, strict=False))
                exact_utts += mine == theirs
            rate = agree / total if total else 1.0
            print(
                f"{mode:13s}: token agreement {agree}/{total} = {rate:.4%}; "
                f"identical utterances {exact_utts}/{len(inputs)}"
            )
            if mode != "batched_sdpa":
                failures += exact_utts != len(inputs)
        counts_ok = all(len(t) == tok.expected_tokens(len(x)) for t, x in zip(ours, inputs, strict=True))
        print(f"token count == ceil-law for every input: {counts_ok}")
        failures += not counts_ok
        if model_dir == base and ref["states"]:
            worst = 0.0
            for audio, ref_windows in zip(inputs, ref["states"], strict=True):
                for mine_w, ref_w in zip(our_states(tok, audio), ref_windows, strict=True):
                    for a, b in zip(mine_w, ref_w, strict=True):
                        worst = max(
                            worst, float(np.abs(a - np.asarray(b, dtype=np.float32)).max(initial=0.0))
                        )
            print(f"layer inputs at real frames: max |ours - reference| = {worst:.3g}")
            failures += worst > 1e-4
    print(f"\n{'PARITY OK' if failures == 0 else f'PARITY FAILURES: {failures}'}  (work dir {work})")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", choices=["ours", "reference"], default="ours")
    parser.add_argument(
        "--reference-root", required=True, help="GLM-4-Voice checkout (has speech_tokenizer/)"
    )
    parser.add_argument(
        "--reference-python", default=sys.executable, help="interpreter with transformers==4.44.1"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codebook-size", type=int, default=64)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "reference":
        reference_side(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
