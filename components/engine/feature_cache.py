"""Encoder-feature cache: the frozen encoder's outputs computed once, memory-mapped, reused.

The encoder is most of the compute and is frozen, so for inputs that do not change between epochs
(the training images, the fixed pseudo-anomaly bank) its outputs — F_Q and the group means, i.e.
exactly what :meth:`InpFormer.forward_features` consumes — are stored once as an fp16 (or, with
``dtype="fp32"``, the encoder's exact fp32) array ``features.npy`` of shape n×(1+G)×N×C and
memory-mapped by every epoch and every sweep trial.

The key hashes the image bytes, the transform sizes, the encoder's weights, taps and groups: any
change gives a new folder, never a stale read. A cache is written under ``<key>.partial-<pid>`` and
renamed when complete, under a lock (``<key>.lock``): concurrent processes (sweep workers) wait for
the one that builds it, then read it. ``done.json`` records the array's shape, byte size and BLAKE2 digest; opening
a cache always checks the size and the ``.npy`` header, and the first open in a process (a new run)
also the digest unless ``verify="size"``. A damaged cache is rebuilt, with a warning naming the
file. Where inputs change every epoch (on-the-fly synthesis, few-shot
augmentation) :class:`CachedFeatureDataset` falls back to the encoder for those inputs only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from components.constants import CACHE_VERIFY_MODES, check_choice
from components.data import batch as keys
from components.data.cache import CACHE_FORMAT
from components.data.datasets import ImageDataset
from components.data.io import read_mask, read_rgb
from components.files import file_digest

if TYPE_CHECKING:
    from components.model import InpFormer

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_VERIFY_MODES",
    "ENCODE_BATCH",
    "CacheSettings",
    "CachedFeatureDataset",
    "FeatureCache",
    "cached_dataset",
    "encoder_fingerprint",
]

ENCODE_BATCH = 16  # images per batch of the one-off encoder pass
CACHE_HASH = "blake2b"  # of the image files (key) and of the cached array
_VERIFIED: set[str] = set()  # caches whose digest this process has checked
CACHE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # fp16: half the bytes; fp32: the encoder's values


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``<folder>.lock`` (POSIX ``flock``; released when the process dies)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def reset_verified() -> None:
    """Forget which caches were verified: the next open checks digests again (a new run in this process)."""
    _VERIFIED.clear()


@dataclass(frozen=True)
class CacheSettings:
    """How a cache is built and checked: encoder device, progress bar, ``verify`` (:data:`CACHE_VERIFY_MODES`),
    and without a bar a log line every ``report_every_s`` seconds while building. ``arithmetic``: what
    decides the encoder's rounding besides its weights (CPU kernels, threads; part of the key, so
    features computed under other kernels are never trained on). ``dtype``: :data:`CACHE_DTYPES`
    (fp32 trains on exactly what the encoder computes, at twice the bytes)."""

    device: str = "cpu"
    progress: bool = False
    verify: str = "full"
    report_every_s: float = 30.0
    arithmetic: tuple[str, ...] = ()
    dtype: str = "fp16"

    def __post_init__(self) -> None:
        check_choice("verify", self.verify, CACHE_VERIFY_MODES)
        check_choice("dtype", self.dtype, tuple(CACHE_DTYPES))


def encoder_fingerprint(model: InpFormer) -> str:
    """Hash of everything that determines the cached features apart from the images."""
    h = hashlib.sha256()
    for k, v in sorted(model.encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(
        repr((model.encoder.taps, model.encoder_groups_idx, model.encoder.pos_embed_interp, model.image_size)).encode()
    )
    return h.hexdigest()


class FeatureCache:
    """A memory-mapped n×(1+G)×N×C fp16 (or fp32) array of encoder features for a list of image files.

    Args:
        folder: parent folder of all caches.
        model: the :class:`InpFormer` whose encoder is cached.
        paths: the image files, in dataset order.
        load: ``path → normalised 3×C×C tensor`` (the dataset's transform).
        transform_key: anything identifying the transform (sizes).
        settings: device of the one-off encoder pass (batches of :data:`ENCODE_BATCH`), progress, verify.
        fingerprint: :func:`encoder_fingerprint` of ``model`` when already computed.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        model: InpFormer,
        paths: Sequence[str],
        load: Any,
        transform_key: Any,
        settings: CacheSettings = CacheSettings(),
        fingerprint: str | None = None,
    ) -> None:
        h = hashlib.sha256((fingerprint or encoder_fingerprint(model)).encode())
        h.update(repr(transform_key).encode())
        for p in paths:
            h.update(file_digest(p, CACHE_HASH).encode())
        self.key = h.hexdigest()[:20]
        if settings.dtype != "fp16":  # fp16 keys as before: existing caches stay valid
            h.update(settings.dtype.encode())
            self.key = h.hexdigest()[:20]
        self.dir = Path(folder) / self.key
        self.torch_dtype = CACHE_DTYPES[settings.dtype]
        self.dtype = np.float16 if settings.dtype == "fp16" else np.float32
        self.built = False
        with _build_lock(self.dir):  # concurrent sweep workers: one builds, the others wait and read it
            problem = self.problem(len(paths), settings.verify == "full" and self.key not in _VERIFIED)
            if problem is not None:
                if problem != "not built yet":
                    logger.warning("feature cache damaged: %s; rebuilding it.", problem)
                self._build(model, list(paths), load, settings)
                self.built = True
        _VERIFIED.add(self.key)
        self.array = np.load(self.dir / "features.npy", mmap_mode="r")

    def problem(self, n: int, full: bool) -> str | None:
        """What is wrong with the cache on disk (naming the file), or None when it is intact."""
        done, file = self.dir / "done.json", self.dir / "features.npy"
        if not done.is_file():
            return "not built yet"
        try:
            record = json.loads(done.read_text())
            size, digest, shape = int(record["size"]), str(record["blake2b"]), tuple(record["shape"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{done} records no size and digest"
        if not file.is_file() or file.stat().st_size != size:
            return f"{file} has {file.stat().st_size if file.is_file() else 0} bytes, {size} were written"
        try:
            header = np.load(file, mmap_mode="r")
        except (ValueError, OSError) as err:
            return f"{file}: unreadable .npy header ({err})"
        if header.shape != shape or header.dtype != self.dtype or shape[0] != n:
            want = np.dtype(self.dtype).name
            return f"{file}: array {header.shape} {header.dtype}, expected {shape} {want} for {n} images"
        del header
        if full and file_digest(file, CACHE_HASH) != digest:
            return f"{file} does not match the digest recorded when it was built"
        return None

    def _build(self, model: InpFormer, paths: list[str], load: Any, settings: CacheSettings) -> None:
        batch_size, device, progress = ENCODE_BATCH, settings.device, settings.progress
        started = last = time.monotonic()
        tmp = self.dir.with_name(f"{self.dir.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model = model.to(device).eval()
        arr = None
        with torch.no_grad():
            for start in tqdm(
                range(0, len(paths), batch_size), desc="encoder cache", disable=not progress, leave=False
            ):
                batch = torch.stack([load(p) for p in paths[start : start + batch_size]]).to(device)
                fused, groups, _ = model.encode(batch)
                feats = torch.stack([fused, *groups], dim=1).to(self.torch_dtype).cpu().numpy()
                if arr is None:
                    shape = (len(paths), *feats.shape[1:])
                    arr = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=self.dtype, shape=shape)
                arr[start : start + len(feats)] = feats
                done, now = start + len(feats), time.monotonic()
                if not progress and (now - last >= settings.report_every_s or done == len(paths)):
                    last, rate = now, done / max(now - started, 1e-9)
                    logger.info(
                        "encoder cache: %d/%d images (%.0f %%), %.1f images/s, ETA %.0f s",
                        done,
                        len(paths),
                        100 * done / len(paths),
                        rate,
                        (len(paths) - done) / rate,
                    )
        if arr is None:
            raise ValueError("feature cache: no images to encode.")
        arr.flush()
        shape = list(arr.shape)
        del arr
        file = tmp / "features.npy"
        record = {"n": len(paths), "paths": paths[:5], "shape": shape, "size": file.stat().st_size}
        record["blake2b"] = file_digest(file, CACHE_HASH)
        (tmp / "done.json").write_text(json.dumps(record))
        if self.dir.exists():
            shutil.rmtree(self.dir)
        os.replace(tmp, self.dir)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index], dtype=np.float32))


class CachedFeatureDataset(Dataset):
    """Wraps an :class:`ImageDataset`: normal images come as cached ``features``; pseudo anomalies
    as cached ``anomaly_features`` when they come from the fixed bank, else (on the fly) as images.
    """

    def __init__(self, base: Any, normal: FeatureCache, bank: FeatureCache | None = None, copies: int = 0) -> None:
        if len(normal) != len(base):
            raise ValueError("feature cache and dataset differ in length.")
        self.base = base
        self.normal = normal
        self.bank = bank
        self.copies = copies
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch (selects the bank copy / synthesis stream)."""
        self.epoch = int(epoch)
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.base.records[index]
        item: dict[str, Any] = {
            keys.FEATURES: self.normal[index],
            keys.LABEL: rec.label,
            keys.PATH: rec.path,
            keys.CATEGORY: rec.category,
        }
        if self.bank is not None and self.base.bank is not None:
            entries = self.base.bank[index]
            c = self.epoch % len(entries)
            item[keys.ANOMALY_FEATURES] = self.bank[index * self.copies + c]
            mask = np.asarray(read_mask(entries[c][1]), dtype=np.float32) / 255.0
            item[keys.ANOMALY_MASK] = torch.from_numpy(mask)[None]
        elif self.base.synthesizer is not None:
            full = self.base[index]  # on-the-fly synthesis changes every epoch: no cache for it
            item[keys.ANOMALY_IMAGE], item[keys.ANOMALY_MASK] = full[keys.ANOMALY_IMAGE], full[keys.ANOMALY_MASK]
        return item


def cached_dataset(
    model: InpFormer,
    dataset: ImageDataset,
    folder: str | os.PathLike,
    settings: CacheSettings = CacheSettings(),
):
    """Wrap ``dataset`` so the frozen encoder runs once per image (and bank entry), not per epoch.

    Caches live under ``folder/<key>/``; the encoder is hashed once for both caches.
    """
    tf = dataset.transform

    def load(path: str) -> torch.Tensor:
        return tf.normalize(dataset.unit(path))

    def load_bank(path: str) -> torch.Tensor:
        arr = np.asarray(read_rgb(path), dtype=np.float32) / 255.0
        return tf.normalize(torch.from_numpy(arr).permute(2, 0, 1))

    key = (tf.resize, tf.crop, tf.geometry, CACHE_FORMAT, *settings.arithmetic)  # another view, policy or kernels
    fp = encoder_fingerprint(model)
    paths = [r.path for r in dataset.records]
    normal = FeatureCache(folder, model, paths, load, key, settings, fp)
    bank, copies = None, 0
    if dataset.bank is not None:
        copies = len(dataset.bank[0])
        flat = [img for entries in dataset.bank for img, _ in entries]
        bank = FeatureCache(folder, model, flat, load_bank, ("bank", *key), settings, fp)
    return CachedFeatureDataset(dataset, normal, bank, copies)
