"""The errors a user can fix, in one import-light module (the CLI catches them without loading torch)."""

from __future__ import annotations

__all__ = ["DownloadError", "EncoderWeightsError", "ExportParityError", "RuntimeMissingError"]


class DownloadError(RuntimeError):
    """A download or extraction failed; the message says what to do instead."""


class EncoderWeightsError(RuntimeError):
    """Pretrained encoder weights were required but could not be loaded."""


class ExportParityError(RuntimeError):
    """The exported scorer does not reproduce PyTorch within the tolerances."""


class RuntimeMissingError(ImportError):
    """The runtime an exported artifact needs (onnxruntime) is not installed."""
