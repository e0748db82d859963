"""On-disk cache of decoded, resized and cropped images (uint8), keyed by content and transform.

Small-data epochs are otherwise dominated by PNG/JPEG decoding and antialiased resizing. The key
is a BLAKE2 hash of the file bytes plus the transform's sizes, so an edited image or a new size
never reads a stale entry; entries are written atomically.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageCache"]


class ImageCache:
    """``get(path, transform, compute)`` returns the cached [0, 1] crop or computes and stores it."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(self, path: str | os.PathLike, transform: object) -> str:
        """Content + transform key."""
        h = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(repr((getattr(transform, "resize", None), getattr(transform, "crop", None))).encode())
        return h.hexdigest()

    def get(self, path: str | os.PathLike, transform: object, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """3×C×C float tensor in [0, 1]."""
        key = self.key(path, transform)
        file = self.folder / key[:2] / f"{key}.npy"
        if file.is_file():
            try:
                arr = np.load(file, allow_pickle=False)
                self.hits += 1
                return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
            except (OSError, ValueError):
                file.unlink(missing_ok=True)  # corrupt entry: recompute
        unit = compute()
        arr = (unit.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, file)
        self.misses += 1
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
