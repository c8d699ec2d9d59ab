"""The published checkpoint layouts of the three model services, and a torch-free check of a directory.

Each component reads only some of the files its published repository holds (the LM repository also
carries remote-code Python files the LM service never runs); ``LAYOUTS`` names the files to fetch and
``check_layout`` tells whether a directory has them in a usable state, without loading any weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    component: str
    repo_id: str
    """Published repository on the Hugging Face hub."""
    allow_patterns: tuple[str, ...]
    """The files the service reads (glob patterns, as the hub client takes them)."""
    required: tuple[str, ...]
    """Files that must be present and non-empty."""
    json_files: tuple[str, ...] = ()
    """Files that must parse as JSON objects."""
    env_var: str = ""
    """The service setting that points at the directory."""


LAYOUTS: dict[str, Layout] = {
    "tokenizer": Layout(
        component="tokenizer",
        repo_id="THUDM/glm-4-voice-tokenizer",
        allow_patterns=("config.json", "preprocessor_config.json", "model.safetensors"),
        required=("config.json", "preprocessor_config.json", "model.safetensors"),
        json_files=("config.json", "preprocessor_config.json"),
        env_var="GLMV_TOKENIZER_MODEL_DIR",
    ),
    "lm": Layout(
        component="lm",
        repo_id="THUDM/glm-4-voice-9b",
        allow_patterns=(
            "config.json",
            "generation_config.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "model.safetensors.index.json",
            "model*.safetensors",
        ),
        required=("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"),
        json_files=("config.json", "generation_config.json", "tokenizer_config.json"),
        env_var="GLMV_LM_MODEL_DIR",
    ),
    "decoder": Layout(
        component="decoder",
        repo_id="THUDM/glm-4-voice-decoder",
        allow_patterns=("config.yaml", "flow.pt", "hift.pt"),
        required=("config.yaml", "flow.pt", "hift.pt"),
        env_var="GLMV_DECODER_MODEL_DIR",
    ),
}


def _lm_weights(path: Path) -> list[str]:
    """Problems with the LM's safetensors: one file, or every shard the index names."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        if (path / "model.safetensors").is_file() and (path / "model.safetensors").stat().st_size > 0:
            return []
        return ["neither model.safetensors.index.json nor model.safetensors is present"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"model.safetensors.index.json has no usable weight_map ({exc})"]
    if not shards:
        return ["model.safetensors.index.json maps no tensors"]
    return [
        f"shard {shard} (named in model.safetensors.index.json) is missing or empty"
        for shard in shards
        if not (path / shard).is_file() or (path / shard).stat().st_size == 0
    ]


def check_layout(component: str, path: Path) -> list[str]:
    """Every problem that keeps ``path`` from being loaded as the component's published checkpoint."""
    layout = LAYOUTS[component]
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems = [
        f"{name} is missing or empty"
        for name in layout.required
        if not (path / name).is_file() or (path / name).stat().st_size == 0
    ]
    for name in layout.json_files:
        if (path / name).is_file() and (path / name).stat().st_size > 0:
            try:
                if not isinstance(json.loads((path / name).read_text()), dict):
                    problems.append(f"{name} is not a JSON object")
            except ValueError as exc:
                problems.append(f"{name} is not valid JSON ({exc})")
    if component == "lm":
        problems += _lm_weights(path)
    return problems
