"""The errors a user can fix, in one import-light module (the CLI catches them without loading torch)."""

from __future__ import annotations

__all__ = ["CheckpointError", "DownloadError", "EncoderWeightsError", "ExportParityError", "RuntimeMissingError"]


class CheckpointError(ValueError):
    """A model or checkpoint folder is incomplete or damaged; the message names the file and the fix."""


class DownloadError(RuntimeError):
    """A download or extraction failed; the message says what to do instead."""


class EncoderWeightsError(RuntimeError):
    """Pretrained encoder weights were required but could not be loaded."""


class ExportParityError(RuntimeError):
    """The exported scorer does not reproduce PyTorch within the tolerances."""


class RuntimeMissingError(ImportError):
    """The runtime an exported artifact needs (onnxruntime) is not installed."""
