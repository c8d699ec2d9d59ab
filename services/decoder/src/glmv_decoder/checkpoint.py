"""Load a decoder model directory in the published layout (``config.yaml``, ``flow.pt``, ``hift.pt``).

The config is parsed without executing it (:mod:`glmv_decoder.config`); the weights are read with
``torch.load(weights_only=True)`` and matched strictly: a missing, unexpected or mis-shaped tensor raises
:class:`~glmv_common.errors.CheckpointError` naming the file and the keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmv_common.errors import CheckpointError, missing_checkpoint
from glmv_decoder.config import DecoderConfig, load_config
from glmv_decoder.flow import FlowModel
from glmv_decoder.hift import HiFTGenerator

__all__ = ["LoadedDecoder", "load_decoder", "load_state_dict_file", "resolve_dtype"]

CONFIG_FILE = "config.yaml"
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
_HOW = "Download the GLM-4-Voice decoder (THUDM/glm-4-voice-decoder: config.yaml, flow.pt, hift.pt) into it"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_MAX_LISTED = 12


@dataclass
class LoadedDecoder:
    """A ready decoder: typed config, flow (tokens -> mel) and HiFT vocoder (mel -> waveform)."""

    config: DecoderConfig
    flow: FlowModel
    hift: HiFTGenerator | None
    fingerprint: str  # short hash identifying the exact files
    model_id: str  # the model directory's name
    device: torch.device
    dtype: torch.dtype


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {dtype!r} (use one of {sorted(_DTYPES)})") from None


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_state_dict_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` -> {name: tensor}, or CheckpointError."""
    if not path.is_file():
        raise missing_checkpoint(path, what, _HOW)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise CheckpointError(
            f"{path}: cannot read {what} with torch.load(weights_only=True): {exc}"
        ) from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict key and shape matching against ``module.state_dict()`` (may live on the meta device)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{path} does not match the model described by {CONFIG_FILE}: " + "; ".join(problems)
        )


def _load_module(module: nn.Module, state: dict[str, torch.Tensor], path: Path, device: torch.device,
                 dtype: torch.dtype) -> nn.Module:
    check_state_dict(module, state, path)
    for k, v in state.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{path}: tensor {k} has dtype {v.dtype}, expected floating point")
    result = module.load_state_dict(state, strict=True, assign=True)
    if result.missing_keys or result.unexpected_keys:  # pragma: no cover - check_state_dict covers this
        raise CheckpointError(f"{path}: strict load failed: {result}")
    return module.to(device=device, dtype=dtype).eval()


def fingerprint(paths: list[Path]) -> str:
    """Cheap identity of the model files: config bytes + size, head and tail of every weight file."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        size = p.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with p.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 1 << 20:
                fh.seek(max(1 << 20, size - (1 << 20)))
                h.update(fh.read())
    return h.hexdigest()[:16]


def load_decoder(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    load_hift: bool = True,
    batch_guidance: bool = False,
    hift_dtype: str | torch.dtype = "float32",
) -> LoadedDecoder:
    """Load ``config.yaml`` + ``flow.pt`` (+ ``hift.pt``) from ``model_dir`` onto ``device``: the flow in
    ``dtype``, the vocoder in ``hift_dtype`` (float32 by default whatever ``dtype`` is: its NSF source
    integrates phase over thousands of samples and its iSTFT magnitudes go through exp(), both of which
    half precision audibly degrades, while it costs a small part of a chunk next to the flow's 20
    estimator passes).

    ``batch_guidance``: run the two classifier-free-guidance branches of the flow as one batch of two
    (faster on GPUs; ~1e-6 off the reference) instead of two batch-1 passes (bit-exact with the reference).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise missing_checkpoint(root, "decoder model directory", _HOW)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise missing_checkpoint(config_path, f"decoder {CONFIG_FILE}", _HOW)
    torch_dtype = resolve_dtype(dtype)
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"bad device {device!r}: {exc}") from exc
    cfg = load_config(config_path)

    flow_path = root / FLOW_FILE
    flow_state = load_state_dict_file(flow_path, "flow checkpoint")
    with torch.device("meta"):
        flow = FlowModel(cfg.flow, batch_guidance=batch_guidance)
    flow = _load_module(flow, flow_state, flow_path, torch_device, torch_dtype)
    del flow_state

    hift: HiFTGenerator | None = None
    hift_path = root / HIFT_FILE
    files = [config_path, flow_path]
    if load_hift:
        hift_state = load_state_dict_file(hift_path, "HiFT vocoder checkpoint")
        built = HiFTGenerator(cfg.hift)
        check_state_dict(built, hift_state, hift_path)
        built.load_state_dict(hift_state, strict=True)
        hift = built.to(device=torch_device, dtype=resolve_dtype(hift_dtype)).eval()
        files.append(hift_path)
    return LoadedDecoder(
        config=cfg,
        flow=flow,  # type: ignore[arg-type]
        hift=hift,
        fingerprint=fingerprint(files),
        model_id=root.resolve().name,
        device=torch_device,
        dtype=torch_dtype,
    )
