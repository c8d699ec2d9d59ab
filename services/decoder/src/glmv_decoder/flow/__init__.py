"""The flow-matching mel generator of the GLM-4-Voice speech decoder."""

from glmv_decoder.flow.flow import FlowModel, mel_frames

__all__ = ["FlowModel", "mel_frames"]
