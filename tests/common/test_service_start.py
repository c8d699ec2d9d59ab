"""Each model service names what it serves when it starts, and exits non-zero on a missing checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPONENTS = ["tokenizer", "lm", "decoder"]


def script(component: str) -> str:
    return str(Path(sys.executable).parent / f"glmv-{component}")


@pytest.mark.parametrize("component", COMPONENTS)
def test_missing_checkpoint_exits_nonzero_naming_the_path(component: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    prefix = f"GLMV_{component.upper()}_"
    env = {
        **os.environ,
        f"{prefix}MODEL_DIR": str(missing),
        f"{prefix}PORT": "0",
        f"{prefix}LOG_FORMAT": "text",
    }
    result = subprocess.run(
        [script(component), "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert str(missing) in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
