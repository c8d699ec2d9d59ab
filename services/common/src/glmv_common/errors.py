"""The project's error types. Every bad input or bad checkpoint surfaces as one of these."""

from __future__ import annotations


class GlmvError(Exception):
    """Base class: a problem the caller can act on, with a message that names it."""


class AudioError(GlmvError, ValueError):
    """Audio could not be decoded, encoded or is not acceptable (empty, corrupt, NaN, bad rate...)."""


class CheckpointError(GlmvError):
    """A model directory is missing, incomplete or does not match the expected published layout."""


class InvalidRequest(GlmvError, ValueError):
    """A request is malformed or violates a limit (maps to INVALID_ARGUMENT / HTTP 4xx)."""


def missing_checkpoint(path: object, what: str, how: str) -> CheckpointError:
    """A uniform message for a missing checkpoint file or directory."""
    return CheckpointError(
        f"{what} not found at {path}. {how} "
        "(models are never downloaded at run time; for development run `glmv models make-dev`)."
    )
