"""HiFT vocoder: published key layout, length law, cache_source semantics, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glmv_decoder.hift import F0PredictorConfig, HiFTConfig, HiFTGenerator

KEYS_TSV = Path("/work/shared/research/spec-decoder-hift-keys.tsv")
TINY = HiFTConfig(base_channels=32, f0_predictor=F0PredictorConfig(cond_channels=16))

# The published hift.pt layout (spec-decoder-hift-keys.tsv), kept here as a compact generator so the test
# does not depend on the research folder being present.
_RES = [("source_resblocks.0", 256, 7), ("source_resblocks.1", 128, 11)] + [
    (f"resblocks.{i}", 256 if i < 3 else 128, (3, 7, 11)[i % 3]) for i in range(6)
]


def published_keys() -> list[tuple[str, tuple[int, ...]]]:
    keys: list[tuple[str, tuple[int, ...]]] = [
        ("m_source.l_linear.weight", (1, 9)),
        ("m_source.l_linear.bias", (1,)),
    ]

    def wn(prefix: str, shape: tuple[int, ...], g0: int) -> None:
        keys.extend(
            [
                (f"{prefix}.bias", (shape[0],)),
                (f"{prefix}.weight_g", (g0, 1, 1)),
                (f"{prefix}.weight_v", shape),
            ]
        )

    wn("conv_pre", (512, 80, 7), 512)
    keys.extend(
        [
            ("ups.0.bias", (256,)),
            ("ups.0.weight_g", (512, 1, 1)),
            ("ups.0.weight_v", (512, 256, 16)),
            ("ups.1.bias", (128,)),
            ("ups.1.weight_g", (256, 1, 1)),
            ("ups.1.weight_v", (256, 128, 16)),
        ]
    )
    keys.extend(
        [
            ("source_downs.0.weight", (256, 18, 16)),
            ("source_downs.0.bias", (256,)),
            ("source_downs.1.weight", (128, 18, 1)),
            ("source_downs.1.bias", (128,)),
        ]
    )
    for prefix, c, k in _RES:
        for conv in ("convs1", "convs2"):
            for d in range(3):
                wn(f"{prefix}.{conv}.{d}", (c, c, k), c)
        for act in ("activations1", "activations2"):
            for d in range(3):
                keys.append((f"{prefix}.{act}.{d}.alpha", (c,)))
    wn("conv_post", (18, 128, 7), 18)
    for i in range(5):
        wn(f"f0_predictor.condnet.{2 * i}", (512, 80 if i == 0 else 512, 3), 512)
    keys.extend([("f0_predictor.classifier.weight", (1, 512)), ("f0_predictor.classifier.bias", (1,))])
    return keys


def _ours() -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = HiFTGenerator(HiFTConfig())
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_state_dict_matches_published_layout() -> None:
    ours = _ours()
    assert len(ours) == 227
    assert ours == published_keys()
    assert sum(torch.Size(s).numel() for _, s in ours) == 20_460_591


@pytest.mark.skipif(not KEYS_TSV.exists(), reason="research key list not available")
def test_state_dict_matches_research_tsv() -> None:
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines() if line.strip()]
    assert [(k, str(s)) for k, s in _ours()] == [(k, s) for k, s in rows]


@pytest.fixture(scope="module")
def tiny() -> HiFTGenerator:
    torch.manual_seed(0)
    model = HiFTGenerator(TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "weight_g")):
                p.uniform_(0.5, 1.5)
            elif name == "f0_predictor.classifier.bias":
                p.fill_(150.0)
            else:
                p.normal_(0, 0.05)
    return model


def _mel(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 80, t, generator=torch.Generator().manual_seed(seed)) - 4


@pytest.mark.parametrize("frames", [1, 2, 7, 34, 35, 100])
def test_length_law(tiny: HiFTGenerator, frames: int) -> None:
    speech, source = tiny.inference(_mel(frames), None, torch.Generator().manual_seed(1))
    assert speech.shape == (1, 256 * frames) and speech.dtype == torch.float32
    assert source.shape == (1, 1, 256 * frames)
    assert speech.abs().max() <= 0.99 + 1e-6
    assert torch.isfinite(speech).all()


def test_deterministic_per_generator_and_no_global_rng(tiny: HiFTGenerator) -> None:
    mel = _mel(20)
    state = torch.get_rng_state()
    a, sa = tiny.inference(mel, None, torch.Generator().manual_seed(42))
    b, sb = tiny.inference(mel, None, torch.Generator().manual_seed(42))
    c, _ = tiny.inference(mel, None, torch.Generator().manual_seed(43))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, c)


def test_generator_draw_order_matches_reference_shapes(tiny: HiFTGenerator) -> None:
    """The generator advances by rand(1,9,1) + randn(1,9,L) + randn(1,L,1), as the reference's global RNG."""
    t = 5
    g = torch.Generator().manual_seed(9)
    tiny.inference(_mel(t), None, g)
    h = torch.Generator().manual_seed(9)
    torch.rand((1, 9, 1), generator=h)
    torch.randn((1, 9, 256 * t), generator=h)
    torch.randn((1, 256 * t, 1), generator=h)
    assert torch.equal(g.get_state(), h.get_state())


def test_cache_source_replaces_head_of_source(tiny: HiFTGenerator) -> None:
    mel = _mel(12)
    cache = torch.full((1, 1, 256), 0.25)
    plain_speech, plain = tiny.inference(mel, None, torch.Generator().manual_seed(5))
    speech, src = tiny.inference(mel, cache, torch.Generator().manual_seed(5))
    assert torch.equal(src[..., :256], cache)
    assert torch.equal(src[..., 256:], plain[..., 256:])
    assert not torch.equal(speech[..., :256], plain_speech[..., :256])
    # an empty cache is the same as none
    speech0, _ = tiny.inference(mel, torch.zeros(1, 1, 0), torch.Generator().manual_seed(5))
    assert torch.equal(speech0, plain_speech)
    with pytest.raises(ValueError):
        tiny.inference(_mel(1), torch.zeros(1, 1, 300), torch.Generator())


def test_cached_source_continues_previous_chunk(tiny: HiFTGenerator) -> None:
    """Streaming use: the last frame of chunk A re-synthesised at the head of chunk B with A's source."""
    mel = _mel(40)
    _, src_a = tiny.inference(mel[..., :20], None, torch.Generator().manual_seed(1))
    _, src_b = tiny.inference(mel[..., 19:], src_a[..., -256:], torch.Generator().manual_seed(2))
    assert torch.equal(src_b[..., :256], src_a[..., -256:])


def test_weight_norm_loads_legacy_keys_and_invalidates_cache(tiny: HiFTGenerator) -> None:
    model = HiFTGenerator(TINY)
    model.load_state_dict(tiny.state_dict(), strict=True)
    mel = _mel(6)
    a, _ = model.inference(mel, None, torch.Generator().manual_seed(0))
    b, _ = tiny.inference(mel, None, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    conv = model.conv_pre
    v, g = conv.weight_v.detach(), conv.weight_g.detach()
    assert torch.allclose(conv.weight(), g * v / v.norm(dim=(1, 2), keepdim=True), atol=1e-6)
    sd = model.state_dict()
    sd["conv_post.weight_g"] = sd["conv_post.weight_g"] * 2
    model.load_state_dict(sd, strict=True)
    c, _ = model.inference(mel, None, torch.Generator().manual_seed(0))
    assert not torch.equal(a, c)
    with pytest.raises(RuntimeError):
        model.load_state_dict({k.replace("weight_g", "weight"): t for k, t in sd.items()}, strict=True)


def test_rejects_bad_mel(tiny: HiFTGenerator) -> None:
    with pytest.raises(ValueError):
        tiny.inference(torch.zeros(1, 79, 5))
    with pytest.raises(ValueError):
        tiny.inference(torch.zeros(1, 80, 0))


def test_config_from_dict_round_trip() -> None:
    cfg = HiFTConfig.from_dict(
        {
            "upsample_rates": [8, 8],
            "istft_params": {"n_fft": 16, "hop_len": 4},
            "f0_predictor": {"num_class": 1, "in_channels": 80, "cond_channels": 512},
        }
    )
    assert cfg == HiFTConfig()
    assert cfg.samples_per_frame == 256
    with pytest.raises(ValueError):
        HiFTConfig.from_dict({"bogus": 1})
