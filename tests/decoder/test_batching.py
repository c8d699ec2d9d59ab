"""Cross-stream batching: batched flow / vocoder / chunk steps equal each stream's unbatched decoding, and
the final chunk of a stream is decoded in one flow + one vocoder call, as the reference does."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from glmv_decoder.checkpoint import load_decoder
from glmv_decoder.devmodel import write_dev_checkpoint
from glmv_decoder.streaming import MEL_OVERLAP, SOURCE_CACHE, DecoderStream, feat_len, run_chunks

MEL_TOL = 1e-4
PCM_TOL = 2e-3


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory):
    return load_decoder(write_dev_checkpoint(tmp_path_factory.mktemp("batching") / "dev", seed=1))


def toks(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(64) for _ in range(n)]


def test_flow_batch_equals_rows(decoder) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n_new, n_prompt in ((6, 0), (25, 10), (1, 40), (50, 25), (13, 0)):
        tok = torch.randint(0, 64, (1, n_new), generator=gen)
        ptok = torch.randint(0, 64, (1, n_prompt), generator=gen)
        n_feat = max(0, feat_len(n_prompt) - MEL_OVERLAP) if n_prompt else 0
        rows.append((tok, ptok, torch.randn(1, n_feat, 80, generator=gen) - 4))
    seeds = [42, 7, 42, 123, 9]
    single = [
        decoder.flow.inference(t, p, f, torch.zeros(1, 192), torch.Generator().manual_seed(s))
        for (t, p, f), s in zip(rows, seeds, strict=True)
    ]
    batched = decoder.flow.inference_batch(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
        [torch.Generator().manual_seed(s) for s in seeds],
    )
    for a, b in zip(single, batched, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= MEL_TOL


def test_hift_batch_equals_rows(decoder) -> None:
    gen = torch.Generator().manual_seed(1)
    mels = [torch.randn(1, 80, t, generator=gen) - 4 for t in (1, 36, 7, 60)]
    caches = [None, 0.1 * torch.randn(1, 1, SOURCE_CACHE, generator=gen), None,
              0.1 * torch.randn(1, 1, SOURCE_CACHE, generator=gen)]
    single = [decoder.hift.inference(m, c, torch.Generator().manual_seed(i))
              for i, (m, c) in enumerate(zip(mels, caches, strict=True))]
    batched = decoder.hift.inference_batch(mels, caches, [torch.Generator().manual_seed(i) for i in range(4)])
    for (sa, qa), (sb, qb), cache in zip(single, batched, caches, strict=True):
        assert sa.shape == sb.shape and qa.shape == qb.shape
        assert (sa - sb).abs().max().item() <= PCM_TOL
        if cache is not None:
            assert torch.equal(qb[..., :SOURCE_CACHE], cache)


def test_rows_of_one_length_take_the_unmasked_path(decoder) -> None:
    """Streams in step (same chunk and prompt sizes) are batched without masks; still equal per row."""
    gen = torch.Generator().manual_seed(5)
    rows = [(torch.randint(0, 64, (1, 25), generator=gen), torch.randint(0, 64, (1, 20), generator=gen),
             torch.randn(1, feat_len(20) - MEL_OVERLAP, 80, generator=gen) - 4) for _ in range(3)]
    single = [decoder.flow.inference(t, p, f, torch.zeros(1, 192), torch.Generator().manual_seed(i))
              for i, (t, p, f) in enumerate(rows)]
    batched = decoder.flow.inference_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                           [torch.Generator().manual_seed(i) for i in range(3)])
    for a, b in zip(single, batched, strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() <= MEL_TOL
    mels = [torch.randn(1, 80, 40, generator=gen) - 4 for _ in range(3)]
    one = [decoder.hift.inference(m, None, torch.Generator().manual_seed(i)) for i, m in enumerate(mels)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    many = decoder.hift.inference_batch(mels, [None] * 3, gens)
    for (sa, _), (sb, _) in zip(one, many, strict=True):
        assert sa.shape == sb.shape and (sa - sb).abs().max().item() <= PCM_TOL


# (seed, window, schedule, total tokens, finish with the last chunk's tokens?)
STREAMS = [
    (42, 50, [10, 25, 50], 85, True),
    (7, 0, [6, 1, 30], 44, False),
    (42, 10, [25], 100, True),
    (3, 50, [12, 12], 24, False),  # ends on an empty finish: tail-only vocoder call in a batch
    (5, 20, [40], 40, True),  # a one-chunk stream: its only chunk is final
]


def _chunks(schedule: list[int], total: int, seed: int) -> list[list[int]]:
    ids, out, i, k = toks(total, seed), [], 0, 0
    while i < total:
        size = schedule[min(k, len(schedule) - 1)]
        out.append(ids[i : i + size])
        i, k = i + size, k + 1
    return out


def _unbatched(decoder, seed, window, chunks, finish_with_last) -> list[np.ndarray]:
    s = DecoderStream(decoder, seed=seed, prompt_window_tokens=window)
    if finish_with_last:
        return [s.push(c) for c in chunks[:-1]] + [s.finish(chunks[-1])]
    return [s.push(c) for c in chunks] + [s.finish()]


def test_batched_streams_equal_unbatched(decoder) -> None:
    """Mixed lengths, schedules, windows and seeds, stepped together: every chunk of every stream equals
    its unbatched decoding within the tolerances, with identical sample counts."""
    expected = [_unbatched(decoder, seed, w, _chunks(sch, n, seed + 100), fin)
                for seed, w, sch, n, fin in STREAMS]
    streams = [DecoderStream(decoder, seed=seed, prompt_window_tokens=w) for seed, w, *_ in STREAMS]
    # Each stream's messages: push(chunk)... then finish(last) or finish().
    steps: list[list[tuple[list[int], bool]]] = []
    for seed, _w, sch, n, fin in STREAMS:
        chunks = _chunks(sch, n, seed + 100)
        msgs = [(c, False) for c in (chunks[:-1] if fin else chunks)]
        steps.append([*msgs, (chunks[-1] if fin else [], True)])
    got: list[list[np.ndarray]] = [[] for _ in STREAMS]
    sizes = []
    for k in range(max(len(s) for s in steps)):
        plans, owners = [], []
        for i, stream in enumerate(streams):
            if k >= len(steps[i]):
                continue
            chunk, final = steps[i][k]
            stream.accept(chunk)
            plan = stream.plan_chunk(final)
            if plan is None:
                got[i].append(np.zeros(0, np.float32))
            else:
                plans.append(plan)
                owners.append(i)
        sizes.append(len(plans))
        for i, audio in zip(owners, run_chunks(decoder, plans), strict=True):
            got[i].append(audio)
        for i, stream in enumerate(streams):
            if k == len(steps[i]) - 1:
                stream.close()
    assert max(sizes) == len(STREAMS)  # the streams really were batched
    for exp, out in zip(expected, got, strict=True):
        assert [len(x) for x in exp] == [len(x) for x in out]
        for a, b in zip(exp, out, strict=True):
            if len(a):
                assert np.abs(a - b).max() <= PCM_TOL


def reference_recipe(decoder, chunks: list[list[int]], seed: int = 42) -> list[np.ndarray]:
    """The reference demo's per-chunk token2wav for two chunks, the last one final, written out with the
    model calls: flow (prompt = previous tokens and the mel sent to the vocoder), cross-fade, vocoder with
    the cached frame/source; the final chunk keeps nothing back."""
    assert len(chunks) == 2
    fade = torch.from_numpy(np.hamming(2 * MEL_OVERLAP))
    gen = torch.Generator()
    out = []
    t0 = torch.tensor([chunks[0]])
    gen.manual_seed(seed)
    mel0 = decoder.flow.inference(t0, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80),
                                  torch.zeros(1, 192), gen)
    overlap, sent0 = mel0[:, :, -MEL_OVERLAP:], mel0[:, :, :-MEL_OVERLAP]
    speech, source = decoder.hift.inference(sent0, None, gen)
    out.append(speech[0, :-SOURCE_CACHE].numpy())
    cache_mel, cache_source = sent0[:, :, -1:], source[:, :, -SOURCE_CACHE:]
    gen.manual_seed(seed)
    mel1 = decoder.flow.inference(torch.tensor([chunks[1]]), t0, sent0.transpose(1, 2), torch.zeros(1, 192),
                                  gen)
    head = (mel1[:, :, :MEL_OVERLAP].double() * fade[:MEL_OVERLAP]
            + overlap.double() * fade[MEL_OVERLAP:]).float()
    mel1 = torch.cat([cache_mel, head, mel1[:, :, MEL_OVERLAP:]], dim=2)
    speech, _ = decoder.hift.inference(mel1, cache_source, gen)
    out.append(speech[0].numpy())
    return out


class CountingHiFT:
    """Counts vocoder calls of the wrapped model (batched or not)."""

    def __init__(self, hift) -> None:
        self.hift, self.calls = hift, 0

    def parameters(self):
        return self.hift.parameters()

    def inference(self, *a, **kw):
        self.calls += 1
        return self.hift.inference(*a, **kw)

    def inference_batch(self, *a, **kw):
        self.calls += 1
        return self.hift.inference_batch(*a, **kw)


def test_final_chunk_with_finish_matches_reference_in_one_vocoder_call(decoder) -> None:
    from types import SimpleNamespace

    chunks = [toks(25, 1), toks(50, 2)]
    ref = reference_recipe(decoder, chunks)
    counting = CountingHiFT(decoder.hift)
    dec = SimpleNamespace(config=decoder.config, flow=decoder.flow, hift=counting)
    stream = DecoderStream(dec, seed=42, prompt_window_tokens=0)
    first = stream.push(chunks[0])
    before = counting.calls
    last = stream.finish(chunks[1])
    assert counting.calls - before == 1
    assert len(first) == len(ref[0]) and len(last) == len(ref[1])
    assert np.array_equal(first, ref[0]) and np.array_equal(last, ref[1])
    assert len(first) + len(last) == 256 * feat_len(75)


def test_cli_schedule_last_chunk_is_final(decoder, tmp_path: Path) -> None:
    from glmv_decoder.cli import synthesize

    ids = toks(25, 1) + toks(50, 2)
    ref = reference_recipe(decoder, [ids[:25], ids[25:]])
    audio = synthesize(decoder, ids, [25, 50], seed=42, prompt_window_tokens=50)
    assert len(audio) == sum(len(r) for r in ref)
    assert np.array_equal(audio, np.concatenate(ref))


@pytest.mark.slow
def test_bucketed_and_compiled_estimator_equal_plain(tmp_path: Path) -> None:
    """The GPU settings on CPU: frames padded to a bucket (masked) and the estimator through
    torch.compile (the eager backend here, so no compiler is needed) change nothing beyond rounding."""
    plain = load_decoder(write_dev_checkpoint(tmp_path / "dev", seed=2))
    fast = load_decoder(tmp_path / "dev")
    fast.flow.pad_frames_to = 32
    fast.flow.decoder.compile_estimator("default", backend="eager")
    chunks = [toks(17, 4)]  # one final chunk: tracing the estimator is the slow part
    a = _unbatched(plain, 42, 50, chunks, True)
    b = _unbatched(fast, 42, 50, chunks, True)
    assert [len(x) for x in a] == [len(x) for x in b]
    assert max(np.abs(x - y).max() for x, y in zip(a, b, strict=True)) <= PCM_TOL


def test_half_precision_flow_keeps_vocoder_float32(tmp_path: Path) -> None:
    d = write_dev_checkpoint(tmp_path / "dev", seed=2)
    ref = load_decoder(d)
    half = load_decoder(d, dtype="bfloat16")
    assert half.flow.input_embedding.weight.dtype == torch.bfloat16
    assert next(half.hift.parameters()).dtype == torch.float32
    chunks = [toks(12, 5), toks(20, 6)]
    a = np.concatenate(_unbatched(ref, 42, 50, chunks, True))
    b = np.concatenate(_unbatched(half, 42, 50, chunks, True))
    assert len(a) == len(b) and np.isfinite(b).all()
    assert np.abs(b).max() > 0
