"""Sampling parameters and the batched next-token sampler.

The warper order follows the reference stack (transformers 4.44 with the web demo's settings):
repetition penalty → temperature → top-k → top-p. ``temperature == 0`` means greedy decoding.

Randomness never touches the global RNG: every request owns a CPU ``torch.Generator`` seeded from its
``seed`` and draws exactly one uniform number per sampled token. The token is then picked by inverse
CDF over the filtered distribution, so a seeded request yields the same tokens whatever else shares
its batch (and on any device, up to floating-point differences in the logits).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import torch

from glmv_common.errors import InvalidRequest

# The reference web demo's UI values (temperature 0.2, top_p 0.8, max_new_tokens 2000) and
# transformers 4.44's default top_k of 50 (docs/architecture.md, "Reference deviations: LM").
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 50
DEFAULT_REPETITION_PENALTY = 1.0
DEFAULT_MAX_NEW_TOKENS = 2000
DEFAULT_MAX_AUDIO_TOKENS = 1500


@dataclass(frozen=True)
class SamplingParams:
    """Fully resolved sampling settings of one request."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K  # 0 = off
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY  # 1.0 = off
    seed: int | None = None  # None = a fresh random seed per request
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_audio_tokens: int = DEFAULT_MAX_AUDIO_TOKENS

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validated(self) -> SamplingParams:
        """Return self if every field is in range, else raise :class:`InvalidRequest`."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_audio_tokens < 0:
            raise InvalidRequest(f"max_audio_tokens must be >= 0, got {self.max_audio_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must fit in 64 bits, got {self.seed}")
        return self

    def with_seed(self) -> SamplingParams:
        """A copy with a concrete seed (a random one when none was given)."""
        if self.seed is not None:
            return self
        return replace(self, seed=secrets.randbits(63))


def make_generator(seed: int) -> torch.Generator:
    """The per-request RNG. CPU on purpose: draws are cheap, device-independent and need no sync."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed % (2**64))
    return gen


def vocab_bias(
    vocab_size: int, allowed: int, device: torch.device | str, masked: Collection[int] = ()
) -> torch.Tensor:
    """Additive logit bias: 0 for ids < ``allowed``, -inf for the rest (padding rows of the vocabulary)
    and for the ``masked`` ids (ids inside the range that are no token)."""
    bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    if allowed < vocab_size:
        bias[allowed:] = float("-inf")
    if masked:
        bias[torch.tensor(sorted(masked), dtype=torch.long, device=device)] = float("-inf")
    if bool(torch.isinf(bias).all()):
        raise ValueError("every vocabulary id is masked")
    return bias


@dataclass
class RowSampling:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    presence: torch.Tensor | None  # bool [V]: ids seen so far; only when repetition_penalty != 1


def apply_repetition_penalty(logits: torch.Tensor, presence: torch.Tensor, penalty: torch.Tensor) -> None:
    """In place, as transformers' ``RepetitionPenaltyLogitsProcessor``: divide positive logits of seen ids
    by the penalty, multiply negative ones. ``logits``/``presence`` [n, V], ``penalty`` [n, 1]."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    torch.where(presence, penalised, logits, out=logits)


def sample_next(logits: torch.Tensor, rows: Sequence[RowSampling], bias: torch.Tensor | None) -> list[int]:
    """Pick the next token of each row. ``logits`` [n, V] (any float dtype) is not modified."""
    n, vocab = logits.shape
    assert n == len(rows)
    scores = logits.float()
    scores = scores + bias if bias is not None else scores.clone()
    device = scores.device

    rp_rows = [i for i, r in enumerate(rows) if r.presence is not None and r.params.repetition_penalty != 1.0]
    if rp_rows:
        idx = torch.tensor(rp_rows, device=device)
        sub = scores.index_select(0, idx)
        presence = torch.stack([rows[i].presence for i in rp_rows])  # type: ignore[misc]
        penalty = torch.tensor([[rows[i].params.repetition_penalty] for i in rp_rows], device=device)
        apply_repetition_penalty(sub, presence, penalty)
        scores.index_copy_(0, idx, sub)

    out: list[int | None] = [None] * n
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        picks = scores.index_select(0, torch.tensor(greedy, device=device)).argmax(dim=-1).tolist()
        for i, tok in zip(greedy, picks, strict=True):
            out[i] = tok

    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        picks = _sample_rows(
            scores.index_select(0, torch.tensor(sampled, device=device)), [rows[i] for i in sampled], vocab
        )
        for i, tok in zip(sampled, picks, strict=True):
            out[i] = tok
    return [int(t) for t in out]  # type: ignore[arg-type]


def _sample_rows(scores: torch.Tensor, rows: Sequence[RowSampling], vocab: int) -> list[int]:
    device = scores.device
    temps = torch.tensor([[r.params.temperature] for r in rows], device=device)
    scores = scores / temps
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    width = max(ks)
    if width < vocab:
        vals, ids = scores.topk(width, dim=-1)  # sorted, descending
    else:
        vals, ids = scores.sort(dim=-1, descending=True)
    rank = torch.arange(width, device=device).unsqueeze(0)
    k_t = torch.tensor(ks, device=device).unsqueeze(1)
    vals = vals.masked_fill(rank >= k_t, float("-inf"))
    top_p = torch.tensor([[r.params.top_p] for r in rows], device=device)
    if bool((top_p < 1.0).any()):
        probs = vals.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop = (before >= top_p) & (rank > 0)
        vals = vals.masked_fill(drop, float("-inf"))
    cdf = vals.softmax(dim=-1).cumsum(dim=-1)
    draws = []
    for r in rows:
        assert r.generator is not None, "sampled rows need a generator"
        draws.append(float(torch.rand((), generator=r.generator)))
    u = torch.tensor(draws, device=device, dtype=cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=width - 1)
    return ids.gather(1, choice).squeeze(1).tolist()
