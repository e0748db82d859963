"""On-disk cache of decoded, resized and cropped images (uint8), keyed by content and transform.

Small-data epochs are otherwise dominated by PNG/JPEG decoding and antialiased resizing. The key
is a BLAKE2 hash of the file bytes plus the transform's sizes, so an edited image or a new size
never reads a stale entry; entries are written atomically and end with a BLAKE2 digest of their
bytes, so a damaged entry (truncated, zeroed, overwritten) is recomputed with a warning, never read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from components.files import DEFAULT_FILE_MODE, current_umask

logger = logging.getLogger(__name__)

__all__ = ["ImageCache"]

DIGEST_BYTES = 16  # BLAKE2b digest appended to each entry

CACHE_FORMAT = "upright"  # entries hold EXIF-upright pixels: entries of older versions are never read


class ImageCache:
    """``get(path, transform, compute)`` returns the cached [0, 1] crop or computes and stores it."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(self, path: str | os.PathLike, transform: object) -> str:
        """Content + transform (sizes, field of view) + :data:`CACHE_FORMAT` key."""
        h = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        sizes = tuple(getattr(transform, k, None) for k in ("resize", "crop", "geometry"))
        h.update(repr((*sizes, CACHE_FORMAT)).encode())
        return h.hexdigest()

    def get(self, path: str | os.PathLike, transform: object, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """3×C×C float tensor in [0, 1]."""
        key = self.key(path, transform)
        file = self.folder / key[:2] / f"{key}.npy"
        if file.is_file():
            raw = file.read_bytes()
            body, digest = raw[:-DIGEST_BYTES], raw[-DIGEST_BYTES:]
            try:
                if hashlib.blake2b(body, digest_size=DIGEST_BYTES).digest() != digest:
                    raise ValueError("digest mismatch")
                arr = np.load(io.BytesIO(body), allow_pickle=False)
                self.hits += 1
                return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
            except (OSError, ValueError) as err:
                logger.warning("image cache entry %s is damaged (%s); recomputing it.", file, err)
                file.unlink(missing_ok=True)
        unit = compute()
        arr = (unit.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        file.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, arr, allow_pickle=False)
        body = buffer.getvalue()
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(body + hashlib.blake2b(body, digest_size=DIGEST_BYTES).digest())
        Path(tmp).chmod(DEFAULT_FILE_MODE & ~current_umask())
        os.replace(tmp, file)
        self.misses += 1
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
