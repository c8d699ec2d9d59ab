"""Flow (tokens -> mel): published parameter layout, mel-length law, shapes, determinism, masking."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from glmv_common.errors import InvalidRequest
from glmv_decoder.config import DecoderConfig, FlowConfig
from glmv_decoder.devmodel import dev_config, flow_state_dict
from glmv_decoder.flow import FlowModel, mel_frames
from glmv_decoder.flow.encoder import BlockRelPositionAttention, block_causal_mask

# sha256 of the published flow.pt key list ("key<TAB>shape" lines in state-dict order), as listed in
# research/spec-decoder-flow-keys.tsv (1185 tensors, obtained by instantiating the reference modules).
PUBLISHED_KEYS_SHA256 = "ef34d746639c2057a952c5849bc6745ed980a8b8fd6d07cd23cb94169015cbe5"
SPEC_TSV = Path("/work/shared/research/spec-decoder-flow-keys.tsv")
EMPTY_TOKENS = torch.zeros(1, 0, dtype=torch.long)
EMPTY_FEAT = torch.zeros(1, 0, 80)
SPK = torch.zeros(1, 192)


def key_listing(model: torch.nn.Module) -> str:
    return "".join(f"{k}\t{tuple(v.shape)}\n" for k, v in model.state_dict().items())


def test_published_flow_keys_match_exactly() -> None:
    with torch.device("meta"):
        model = FlowModel(DecoderConfig().flow)
    listing = key_listing(model)
    if SPEC_TSV.is_file():  # the research file, when this checkout has it
        assert listing == SPEC_TSV.read_text()
    assert hashlib.sha256(listing.encode()).hexdigest() == PUBLISHED_KEYS_SHA256
    sd = model.state_dict()
    assert len(sd) == 1185
    assert sum(v.numel() for v in sd.values()) == 111_166_208
    assert tuple(sd["decoder.estimator.up_blocks.0.2.conv.weight"].shape) == (256, 256, 4)
    assert tuple(sd["decoder.estimator.mid_blocks.11.1.3.ff.net.0.proj.weight"].shape) == (1024, 256)
    assert "encoder.encoders.5.self_attn.linear_pos.bias" not in sd


@pytest.mark.parametrize(
    ("n", "frames"),
    [
        (1, 6),
        (10, 68),
        (25, 172),
        (50, 344),
        (75, 516),
        (100, 689),
        (175, 1205),
        (200, 1378),
        (3392, 23372),
        (3776, 26018),
    ],
)
def test_mel_length_law(n: int, frames: int) -> None:
    # float32 evaluation of n / 12.5 * 22050 / 256, truncated (differs from n*441//64 at 3392 and 3776)
    assert mel_frames(n, 12.5) == frames
    if n not in (3392, 3776):
        assert frames == n * 441 // 64


@pytest.fixture(scope="module")
def flow() -> FlowModel:
    cfg = dev_config("dev", 64).flow
    model = FlowModel(cfg)
    model.load_state_dict(flow_state_dict(cfg, seed=3))
    return model


def run(flow: FlowModel, token, prompt=EMPTY_TOKENS, feat=EMPTY_FEAT, seed: int = 42) -> torch.Tensor:
    return flow.inference(token, prompt, feat, SPK, torch.Generator().manual_seed(seed))


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [1, 9, 25, 31])
def test_output_shape_without_prompt(flow: FlowModel, n: int) -> None:
    mel = run(flow, tokens(n))
    assert mel.shape == (1, 80, mel_frames(n)) and mel.dtype == torch.float32
    assert torch.isfinite(mel).all()


def test_output_shape_with_prompt_drops_prompt_frames(flow: FlowModel) -> None:
    prompt, new = tokens(25, 1), tokens(50, 2)
    feat = run(flow, prompt)[:, :, :138].transpose(1, 2)  # as the streaming driver passes it: (1, T, 80)
    mel = run(flow, new, prompt, feat)
    assert mel.shape == (1, 80, mel_frames(75) - 138)


def test_prompt_mel_conditions_the_output(flow: FlowModel) -> None:
    prompt, new = tokens(20, 1), tokens(20, 2)
    feat = torch.randn(1, 100, 80, generator=torch.Generator().manual_seed(5))
    a = run(flow, new, prompt, feat)
    b = run(flow, new, prompt, feat * 0.5)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_deterministic_for_a_seeded_generator_and_no_global_rng_use(flow: FlowModel) -> None:
    tok = tokens(25)
    state = torch.get_rng_state()
    a, b = run(flow, tok, seed=42), run(flow, tok, seed=42)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    c = run(flow, tok, seed=7)
    assert not torch.allclose(a, c)


def test_generator_draws_one_noise_tensor_of_the_mel_shape(flow: FlowModel) -> None:
    g = torch.Generator().manual_seed(42)
    flow.inference(tokens(25), EMPTY_TOKENS, EMPTY_FEAT, SPK, g)
    ref = torch.Generator().manual_seed(42)
    torch.randn((1, 80, mel_frames(25)), generator=ref)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=ref))


def test_encoder_is_block_causal(flow: FlowModel) -> None:
    enc = flow.encoder
    x = flow.input_embedding(tokens(30))
    y = flow.input_embedding(tokens(30, 9))
    with torch.no_grad():
        base = enc(x)
        # Change tokens 20..29 (the third block): outputs of blocks 0 and 1 must not move.
        mixed = torch.cat([x[:, :20], y[:, 20:]], dim=1)
        out = enc(mixed)
        assert torch.allclose(out[:, :20], base[:, :20], atol=1e-6)
        assert not torch.allclose(out[:, 20:], base[:, 20:])
        # Change token 25: token 21 (same block, earlier) sees it.
        mixed = x.clone()
        mixed[:, 25] = y[:, 25]
        out = enc(mixed)
        assert not torch.allclose(out[:, 21], base[:, 21])


def test_block_causal_mask_definition() -> None:
    m = block_causal_mask(8, 3, torch.device("cpu"))
    want = torch.tensor([[j <= i or j // 3 == i // 3 for j in range(8)] for i in range(8)])
    assert torch.equal(m, want)


def test_relative_position_scores_follow_i_minus_j() -> None:
    torch.manual_seed(0)
    attn = BlockRelPositionAttention(2, 8).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    n = 7
    x = torch.randn(1, n, 8)
    pos = torch.randn(1, 2 * n - 1, 8)  # row r <-> relative position (n-1) - r
    allowed = torch.ones(n, n, dtype=torch.bool)
    out = attn(x, pos, allowed)
    # Explicit reference: score(i, j) = (q_i+u).k_j + (q_i+v).p_{i-j}
    q = attn.linear_q(x).view(n, 2, 4)
    k = attn.linear_k(x).view(n, 2, 4)
    v = attn.linear_v(x).view(n, 2, 4)
    p = attn.linear_pos(pos).view(2 * n - 1, 2, 4)
    scores = torch.empty(2, n, n)
    for i in range(n):
        for j in range(n):
            r = (n - 1) - (i - j)
            content = ((q[i] + attn.pos_bias_u) * k[j]).sum(-1)
            scores[:, i, j] = content + ((q[i] + attn.pos_bias_v) * p[r]).sum(-1)
    w = torch.softmax(scores / math.sqrt(4), dim=-1)
    ctx = torch.einsum("hij,jhd->ihd", w, v).reshape(1, n, 8)
    assert torch.allclose(out, attn.linear_out(ctx), atol=1e-5)


def test_invalid_inputs_are_rejected(flow: FlowModel) -> None:
    with pytest.raises(InvalidRequest, match="ids"):
        run(flow, torch.tensor([[0, 64]]))
    with pytest.raises(InvalidRequest, match="ids"):
        run(flow, torch.tensor([[-1, 3]]))
    with pytest.raises(InvalidRequest, match="at least one"):
        run(flow, EMPTY_TOKENS)
    with pytest.raises(InvalidRequest, match="shape"):
        run(flow, torch.tensor([1, 2, 3]))
    with pytest.raises(InvalidRequest, match="integer"):
        run(flow, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(InvalidRequest, match="prompt_feat"):
        run(flow, tokens(5), tokens(5), torch.zeros(1, 10, 79))
    with pytest.raises(InvalidRequest, match="more than"):
        run(flow, tokens(1), tokens(1), torch.zeros(1, 20, 80))
    with pytest.raises(InvalidRequest, match="embedding"):
        flow.inference(tokens(3), EMPTY_TOKENS, EMPTY_FEAT, torch.zeros(1, 80), torch.Generator())


def test_flow_stays_in_eval_mode(flow: FlowModel) -> None:
    flow.train()
    assert not flow.training and not any(m.training for m in flow.modules())


def test_published_size_builds_on_meta() -> None:
    with torch.device("meta"):
        model = FlowModel(FlowConfig(vocab_size=16384))
    assert model.encoder.block_size == 10 and len(model.decoder.estimator.mid_blocks) == 12
