"""Fixtures for the LM tests: one dev checkpoint (ChatGLM layout + tokenizer) per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmv_lm.devmodel import write_dev_checkpoint
from glmv_lm.text_tokenizer import GlmTextTokenizer


@pytest.fixture(scope="session")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dev_checkpoint(
        tmp_path_factory.mktemp("lm-dev") / "glm-4-voice-dev", seed=0, codebook_size=64
    )


@pytest.fixture(scope="session")
def tok(dev_dir: Path) -> GlmTextTokenizer:
    return GlmTextTokenizer.from_dir(dev_dir)
