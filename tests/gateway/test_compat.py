"""The gateway refuses a mismatched set of model services, naming both sides."""

from __future__ import annotations

from glmv_gateway.clients import compatibility_problems
from glmvoice.v1 import common_pb2


def infos(tok: int, lm: int, dec: int, rate: float = 12.5) -> dict[str, common_pb2.ModelInfo]:
    return {
        "tokenizer": common_pb2.ModelInfo(
            component="tokenizer",
            model_id="glm-4-voice-tokenizer",
            version="0.1.0",
            codebook_size=tok,
            token_rate_hz=12.5,
            checkpoint_fingerprint="a" * 64,
        ),
        "lm": common_pb2.ModelInfo(
            component="lm",
            model_id="glm-4-voice-9b",
            version="0.1.0",
            audio_token_count=lm,
            codebook_size=lm,
            token_rate_hz=12.5,
            checkpoint_fingerprint="b" * 64,
        ),
        "decoder": common_pb2.ModelInfo(
            component="decoder",
            model_id="glm-4-voice-decoder",
            version="0.2.0",
            codebook_size=dec,
            token_rate_hz=rate,
            checkpoint_fingerprint="c" * 64,
        ),
    }


def test_matching_set_is_compatible() -> None:
    assert compatibility_problems(infos(16384, 16384, 16384)) == []


def test_codebook_mismatch_names_every_side() -> None:
    (problem,) = compatibility_problems(infos(16384, 16384, 4096))
    assert "glm-4-voice-decoder" in problem and "version 0.2.0" in problem and "4096" in problem
    assert "glm-4-voice-tokenizer" in problem and "16384" in problem


def test_token_rate_mismatch() -> None:
    problems = compatibility_problems(infos(64, 64, 64, rate=25.0))
    assert len(problems) == 1 and "token rates differ" in problems[0] and "25.0" in problems[0]
