"""Decoder parity: glmv_decoder (flow + HiFT + streaming) vs the reference GLM-4-Voice ``AudioDecoder``.

Run OUTSIDE the project venv, in a scratch venv with the reference's dependencies (torch, hyperpyyaml,
omegaconf, diffusers 0.27.2, einops, conformer, scipy, pyyaml; see services/decoder/README or the helper
report), pointing at a checkout of GLM-4-Voice whose ``third_party/Matcha-TTS`` submodule is populated.
This script contains no reference code: it imports ``flow_inference.AudioDecoder`` from ``--reference``.

    python scripts/parity/decoder_parity.py --reference /path/to/GLM-4-Voice --make-dev /tmp/dec-dev
    python scripts/parity/decoder_parity.py --reference /path/to/GLM-4-Voice --model-dir /path/to/decoder

Both sides load the same directory (config.yaml, flow.pt, hift.pt). The reference is switched to eval mode
(it never calls ``.eval()`` itself, which leaves its encoder dropout active). Seed protocol: the reference
reseeds the global RNG with 42 inside every flow call and HiFT continues from that RNG; our side passes a
``torch.Generator`` seeded with 42 to the flow and then to HiFT.

Reported: flow mel max |Δ| (with and without prompt), one-shot PCM max |Δ| + sample counts, the first
two streamed chunks (25 then 50 tokens, web_demo schedule) PCM max |Δ| + sample counts, the same with the
second chunk final (``finalize=True`` vs ``DecoderStream.finish(tokens)``), and both cases decoded as rows
of one batched flow + vocoder call (``run_chunks``).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "services" / "decoder" / "src"), str(REPO / "services" / "common" / "src")]

from glmv_decoder.checkpoint import load_decoder  # noqa: E402
from glmv_decoder.devmodel import write_dev_checkpoint  # noqa: E402
from glmv_decoder.flow import mel_frames  # noqa: E402

FLOW_TOL = 1e-4
PCM_TOL = 2e-3


def import_reference(root: Path) -> type:
    sys.path[:0] = [str(root), str(root / "third_party" / "Matcha-TTS")]
    try:
        from flow_inference import AudioDecoder  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SystemExit(
            f"cannot import the reference from {root}: {exc}\n(flow_inference.py imports torchaudio, which "
            "the decoder path never uses: install it or put an empty `torchaudio` package on PYTHONPATH; "
            "Matcha's matcha/utils/__init__.py imports lightning/hydra at import time)"
        ) from exc

    return AudioDecoder


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="GLM-4-Voice checkout")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", type=Path, help="existing decoder directory")
    src.add_argument("--make-dev", type=Path, help="write a random checkpoint here first")
    ap.add_argument("--size", choices=["dev", "realsize"], default="dev")
    ap.add_argument("--seed", type=int, default=0, help="weight seed for --make-dev")
    ap.add_argument("--codebook-size", type=int, default=None)
    ap.add_argument("--lengths", default="25,60,137", help="token counts for one-shot cases")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-guidance", action="store_true",
                    help="run our CFG branches as one batch of two (not bit-exact; ~1e-6 on the mel)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model_dir
    if args.make_dev is not None:
        model_dir = write_dev_checkpoint(args.make_dev, seed=args.seed, codebook_size=args.codebook_size,
                                         size=args.size)
    AudioDecoder = import_reference(args.reference.resolve())
    ref = AudioDecoder(str(model_dir / "config.yaml"), str(model_dir / "flow.pt"), str(model_dir / "hift.pt"),
                       device="cpu")
    ref.flow.eval()
    ref.hift.eval()
    ours = load_decoder(model_dir, batch_guidance=args.batch_guidance)
    vocab = ours.config.flow.vocab_size
    print(f"model_dir={model_dir} vocab={vocab} fingerprint={ours.fingerprint}")
    ok = True

    def ref_flow(tok: torch.Tensor, ptok: torch.Tensor, pfeat: torch.Tensor) -> torch.Tensor:
        i32 = torch.int32
        return ref.flow.inference(
            token=tok, token_len=torch.tensor([tok.shape[1]], dtype=i32),
            prompt_token=ptok, prompt_token_len=torch.tensor([ptok.shape[1]], dtype=i32),
            prompt_feat=pfeat, prompt_feat_len=torch.tensor([pfeat.shape[1]], dtype=i32),
            embedding=torch.zeros(1, 192),
        )

    def our_flow(tok, ptok, pfeat, g=None):
        g = g or torch.Generator().manual_seed(42)
        return ours.flow.inference(tok, ptok, pfeat, torch.zeros(1, 192), g)

    gen = torch.Generator().manual_seed(1234)
    no_tok, no_feat = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80)

    # 1. flow without prompt (the frame counts also check the mel-length law against the reference's own)
    lengths = [int(x) for x in args.lengths.split(",")]
    for n in lengths:
        tok = torch.randint(0, vocab, (1, n), generator=gen)
        a, b = ref_flow(tok, no_tok, no_feat), our_flow(tok, no_tok, no_feat)
        d = max_abs(a, b)
        ok &= d <= FLOW_TOL and b.shape[2] == mel_frames(n)
        print(f"flow   N={n:4d} frames ref={a.shape[2]} ours={b.shape[2]} max|Δ|={d:.3e} "
              f"(|mel|max={a.abs().max():.2f})")

    # 2. flow with prompt tokens + prompt mel (the second web_demo call)
    ptok = torch.randint(0, vocab, (1, 25), generator=gen)
    tok = torch.randint(0, vocab, (1, 50), generator=gen)
    pfeat = ref_flow(ptok, no_tok, no_feat)[:, :, :138].transpose(1, 2).contiguous()
    a, b = ref_flow(tok, ptok, pfeat), our_flow(tok, ptok, pfeat)
    d = max_abs(a, b)
    ok &= d <= FLOW_TOL
    print(f"flow   prompt 25 tok/138 frames + 50 new: frames ref={a.shape[2]} ours={b.shape[2]} "
          f"max|Δ|={d:.3e}")

    if ours.hift is None:
        print("no hift: PCM parity skipped")
        return 0 if ok else 1

    # 3. one-shot PCM (reference offline_inference == token2wav(finalize=True))
    for n in lengths:
        tok = torch.randint(0, vocab, (1, n), generator=gen)
        with torch.inference_mode():
            ref_pcm, _ = ref.token2wav(tok, uuid=str(uuid.uuid4()), finalize=True)
        g = torch.Generator().manual_seed(42)
        mel = our_flow(tok, no_tok, no_feat, g)
        our_pcm, _ = ours.hift.inference(mel, None, g)
        d = max_abs(ref_pcm, our_pcm)
        ok &= d <= PCM_TOL and ref_pcm.shape == our_pcm.shape
        print(f"oneshot N={n:4d} samples ref={ref_pcm.shape[-1]} ours={our_pcm.shape[-1]} max|Δ|={d:.3e} "
              f"(|pcm|max={ref_pcm.abs().max():.3f})")

    # 4. first two streamed chunks (web_demo schedule 25, 50), reference vs glmv_decoder.streaming
    try:
        from glmv_decoder.streaming import DecoderStream
    except ImportError:
        print("glmv_decoder.streaming not available: streaming parity skipped")
        return 0 if ok else 1
    tok = torch.randint(0, vocab, (1, 75), generator=gen)
    sid = str(uuid.uuid4())
    with torch.inference_mode():
        r0, m0 = ref.token2wav(tok[:, :25], uuid=sid, prompt_token=torch.zeros(1, 0, dtype=torch.int32),
                               prompt_feat=torch.zeros(1, 0, 80), finalize=False)
        r1, _ = ref.token2wav(tok[:, 25:75], uuid=sid, prompt_token=tok[:, :25],
                              prompt_feat=m0.transpose(1, 2), finalize=False)
    stream = DecoderStream(ours, seed=42, prompt_window_tokens=0)
    o0 = torch.from_numpy(stream.push(tok[0, :25].tolist())).reshape(1, -1)
    o1 = torch.from_numpy(stream.push(tok[0, 25:75].tolist())).reshape(1, -1)
    stream.close()
    for i, (r, o) in enumerate(((r0, o0), (r1, o1))):
        d = max_abs(r, o)
        ok &= d <= PCM_TOL and r.shape == o.shape
        print(f"stream chunk {i}: samples ref={r.shape[-1]} ours={o.shape[-1]} max|Δ|={d:.3e}")

    # 5. the same two chunks with the second one final (the reference demo's last chunk; our Finish with
    #    tokens / CLI --schedule), unbatched and batched together with a second stream (run_chunks).
    from glmv_decoder.streaming import run_chunks

    sid = str(uuid.uuid4())
    with torch.inference_mode():
        f0, fm0 = ref.token2wav(tok[:, :25], uuid=sid, prompt_token=torch.zeros(1, 0, dtype=torch.int32),
                                prompt_feat=torch.zeros(1, 0, 80), finalize=False)
        f1, _ = ref.token2wav(tok[:, 25:75], uuid=sid, prompt_token=tok[:, :25],
                              prompt_feat=fm0.transpose(1, 2), finalize=True)
    stream = DecoderStream(ours, seed=42, prompt_window_tokens=0)
    g0 = torch.from_numpy(stream.push(tok[0, :25].tolist())).reshape(1, -1)
    g1 = torch.from_numpy(stream.finish(tok[0, 25:75].tolist())).reshape(1, -1)
    a = DecoderStream(ours, seed=42, prompt_window_tokens=0)
    b = DecoderStream(ours, seed=42, prompt_window_tokens=0)
    a.accept(tok[0, :25].tolist())
    b.accept(tok[0, :25].tolist())
    ba0, bb0 = run_chunks(ours, [a.plan_chunk(False), b.plan_chunk(False)])
    a.accept(tok[0, 25:75].tolist())
    b.accept(tok[0, 25:75].tolist())
    ba1, bb1 = run_chunks(ours, [a.plan_chunk(False), b.plan_chunk(True)])
    cases = (("final chunk 0", f0, g0), ("final chunk 1 (final)", f1, g1),
             ("batched chunk 0", r0, ba0), ("batched chunk 1", r1, ba1),
             ("batched final chunk 0", f0, bb0), ("batched final chunk 1 (final)", f1, bb1))
    for name, r, o in cases:
        o = torch.as_tensor(o).reshape(1, -1)
        d = max_abs(r, o)
        ok &= d <= PCM_TOL and r.shape == o.shape
        print(f"{name}: samples ref={r.shape[-1]} ours={o.shape[-1]} max|Δ|={d:.3e}")
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
