"""HiFT parity: glmv_decoder.hift vs the reference GLM-4-Voice HiFTGenerator on the same random weights.

Run OUTSIDE the project venv, in a scratch venv that has torch + numpy + scipy, pointing at a checkout of
the reference repository (this script contains no reference code; it imports it from ``--ref``):

    python scripts/parity/decoder_hift_parity.py --ref /path/to/GLM-4-Voice [--size realsize|dev]

Weights: our generator is built from the config, every parameter is filled with seeded random values, the
state dict (legacy weight_g/weight_v keys) is loaded into the reference with strict=True. The reference draws
its sine phases/noise from torch's global RNG; we seed the global RNG and our private generator with the same
seed, which must give identical draws. Prints max |Δ| of speech and source for several cases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services" / "decoder" / "src"))

from glmv_decoder.hift import F0PredictorConfig, HiFTConfig, HiFTGenerator


def build_reference(cfg: HiFTConfig, ref_root: str) -> torch.nn.Module:
    sys.path.insert(0, ref_root)
    from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor  # type: ignore
    from cosyvoice.hifigan.generator import HiFTGenerator as RefHiFT  # type: ignore

    f0 = ConvRNNF0Predictor(num_class=cfg.f0_predictor.num_class, in_channels=cfg.f0_predictor.in_channels,
                            cond_channels=cfg.f0_predictor.cond_channels)
    return RefHiFT(
        in_channels=cfg.in_channels, base_channels=cfg.base_channels, nb_harmonics=cfg.nb_harmonics,
        sampling_rate=cfg.sampling_rate, nsf_alpha=cfg.nsf_alpha, nsf_sigma=cfg.nsf_sigma,
        nsf_voiced_threshold=cfg.nsf_voiced_threshold, upsample_rates=list(cfg.upsample_rates),
        upsample_kernel_sizes=list(cfg.upsample_kernel_sizes), istft_params=dict(cfg.istft_params),
        resblock_kernel_sizes=list(cfg.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in cfg.resblock_dilation_sizes],
        source_resblock_kernel_sizes=list(cfg.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=[list(d) for d in cfg.source_resblock_dilation_sizes],
        lrelu_slope=cfg.lrelu_slope, audio_limit=cfg.audio_limit, f0_predictor=f0,
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "weight_g")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name == "f0_predictor.classifier.bias":
                p.fill_(120.0)  # mostly voiced F0 so the harmonic path is exercised
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True, help="root of a GLM-4-Voice checkout (has cosyvoice/)")
    ap.add_argument("--size", choices=["realsize", "dev"], default="realsize")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.size == "realsize":
        cfg = HiFTConfig()
    else:
        cfg = HiFTConfig(base_channels=64, f0_predictor=F0PredictorConfig(cond_channels=32))
    ours = HiFTGenerator(cfg)
    randomize(ours, 0)
    ref = build_reference(cfg, args.ref)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()
    worst = 0.0
    for case, (frames, cache_len, seed) in enumerate([(20, 0, 42), (57, 256, 42), (138, 256, 7), (1, 0, 3)]):
        gen = torch.Generator().manual_seed(100 + case)
        mel = torch.randn(1, cfg.in_channels, frames, generator=gen) * 2 - 4
        cache = torch.randn(1, 1, cache_len, generator=torch.Generator().manual_seed(200 + case)) * 0.1
        torch.manual_seed(seed)
        r_speech, r_src = ref.inference(mel, cache)
        o_speech, o_src = ours.inference(mel, cache, torch.Generator().manual_seed(seed))
        d_speech = (r_speech - o_speech).abs().max().item()
        d_src = (r_src - o_src).abs().max().item()
        worst = max(worst, d_speech, d_src)
        rms = o_speech.pow(2).mean().sqrt().item()
        print(f"T={frames:4d} cache={cache_len:3d} seed={seed:3d}  speech {tuple(o_speech.shape)} "
              f"max|Δspeech|={d_speech:.3e} max|Δsource|={d_src:.3e} rms(speech)={rms:.3e}")
    print(f"worst max|Δ| = {worst:.3e}")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
