"""The embedded default dataset ``synthetic``: generated deterministically, in seconds, on a CPU.

Categories (MVTec layout on disk):
* ``brick``, ``grass``, ``gravel`` — textured surfaces cropped from the real photographs that
  scikit-image ships, tinted, flipped and slightly jittered;
* ``washer`` — an object: a shaded metal ring with six bolt holes, jittered in position and
  lighting.

Test defects are *drawn* (scratches, holes, stains/colour changes, cracks, foreign particles, and
for the object a missing bolt hole or a chipped rim) with exact pixel masks. They come from a
different generator than the Perlin/texture pseudo anomalies used for training (§13.6), so
evaluation on this set is not circular.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import skimage.data

__all__ = ["DEFECT_PAINTERS", "SYNTHETIC_CATEGORIES", "generate_synthetic"]

SYNTHETIC_CATEGORIES = ("brick", "grass", "gravel", "washer")
_TINTS = {"brick": (1.15, 0.85, 0.7), "grass": (0.8, 1.1, 0.75), "gravel": (1.0, 0.97, 0.9)}


def _photo(name: str) -> np.ndarray:
    return getattr(skimage.data, name)().astype(np.float32)


def _texture_image(photo: np.ndarray, cat: str, size: int, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(size * 3 // 2, size * 2 + 1))
    y, x = (int(rng.integers(0, photo.shape[i] - side + 1)) for i in (0, 1))
    crop = cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    gain, bias = rng.uniform(0.92, 1.08), rng.uniform(-8, 8)
    rgb = np.stack([crop * t for t in _TINTS[cat]], axis=-1) * gain + bias
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _washer_geometry(size: int, rng: np.random.Generator) -> dict:
    c = size / 2 + rng.uniform(-2, 2, size=2)
    return {
        "center": c,
        "outer": size * 0.40,
        "inner": size * 0.17,
        "holes": [
            c + size * 0.29 * np.array([np.cos(a), np.sin(a)])
            for a in np.deg2rad(np.arange(6) * 60 + rng.uniform(-2, 2))
        ],
        "hole_r": size * 0.035,
        "light": rng.uniform(0.9, 1.1),
    }


def _washer_image(size: int, geo: dict, rng: np.random.Generator, skip_hole: int = -1) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg = 40 + 10 * rng.standard_normal((size, size)).astype(np.float32)
    img = np.stack([bg * 0.9, bg, bg * 1.1], axis=-1)
    cx, cy = geo["center"]
    r = np.hypot(xx - cx, yy - cy)
    ring = (r <= geo["outer"]) & (r >= geo["inner"])
    shade = 150 + 60 * ((xx - yy) / size) + 30 * np.cos(r / geo["outer"] * np.pi)
    metal = np.stack([shade * 0.95, shade, shade * 1.05], axis=-1) * geo["light"]
    metal += 3 * rng.standard_normal((size, size, 1)).astype(np.float32)
    img = np.where(ring[..., None], metal, img)
    for i, (hx, hy) in enumerate(geo["holes"]):
        if i != skip_hole:
            hole = np.hypot(xx - hx, yy - hy) <= geo["hole_r"]
            img[hole] = (35, 38, 42)
    return np.clip(img, 0, 255).astype(np.uint8)


# -- defect painters: (image uint8 H×W×3, rng, context) → (image, mask bool H×W) ------------------
def _scratch(img: np.ndarray, rng: np.random.Generator, ctx: dict) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    mask = np.zeros(img.shape[:2], np.uint8)
    p0 = rng.uniform(0.2 * s, 0.8 * s, size=2)
    ang = rng.uniform(0, np.pi)
    length = rng.uniform(0.25 * s, 0.5 * s)
    pts = [p0 + t * length * np.array([np.cos(ang), np.sin(ang)]) + rng.normal(0, 1.0, 2) for t in np.linspace(0, 1, 6)]
    pts = np.round(np.array(pts)).astype(np.int32)
    cv2.polylines(mask, [pts], False, 1, thickness=int(rng.integers(1, 3)))
    colour = (230, 230, 225) if rng.random() < 0.5 else (25, 25, 25)
    img = img.copy()
    img[mask > 0] = colour
    return img, mask > 0


def _hole(img: np.ndarray, rng: np.random.Generator, ctx: dict) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    mask = np.zeros(img.shape[:2], np.uint8)
    c = ctx.get("anchor") if ctx.get("anchor") is not None else rng.uniform(0.25 * s, 0.75 * s, size=2)
    axes = (int(rng.integers(3, max(4, s // 16))), int(rng.integers(3, max(4, s // 16))))
    cv2.ellipse(mask, (int(c[0]), int(c[1])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    img = img.copy()
    dark = np.array([12, 10, 8], np.float32) + rng.uniform(0, 15)
    img[mask > 0] = dark.astype(np.uint8)
    return img, mask > 0


def _stain(img: np.ndarray, rng: np.random.Generator, ctx: dict) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    c = ctx.get("anchor") if ctx.get("anchor") is not None else rng.uniform(0.25 * s, 0.75 * s, size=2)
    rad = rng.uniform(s / 14, s / 7, size=2)
    d = ((xx - c[0]) / rad[0]) ** 2 + ((yy - c[1]) / rad[1]) ** 2
    alpha = np.clip(1.5 - d, 0, 1) * rng.uniform(0.6, 0.85)
    mask = alpha > 0.15
    tint = rng.uniform(0, 255, size=3).astype(np.float32)
    out = img.astype(np.float32) * (1 - alpha[..., None]) + tint * alpha[..., None]
    return np.clip(out, 0, 255).astype(np.uint8), mask


def _crack(img: np.ndarray, rng: np.random.Generator, ctx: dict) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    mask = np.zeros(img.shape[:2], np.uint8)
    start = rng.uniform(0.3 * s, 0.7 * s, size=2)
    for _branch in range(int(rng.integers(2, 4))):
        p, ang = start.copy(), rng.uniform(0, 2 * np.pi)
        pts = [p.copy()]
        for _ in range(int(rng.integers(6, 12))):
            ang += rng.normal(0, 0.5)
            p = p + rng.uniform(2, 5) * np.array([np.cos(ang), np.sin(ang)])
            pts.append(p.copy())
        cv2.polylines(mask, [np.round(np.array(pts)).astype(np.int32)], False, 1, thickness=1)
    img = img.copy()
    img[mask > 0] = (img[mask > 0] * 0.25).astype(np.uint8)
    return img, mask > 0


def _particle(img: np.ndarray, rng: np.random.Generator, ctx: dict) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    mask = np.zeros(img.shape[:2], np.uint8)
    c = rng.uniform(0.25 * s, 0.75 * s, size=2)
    n = int(rng.integers(4, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(s / 40, s / 14, n)
    poly = np.stack([c[0] + radii * np.cos(angles), c[1] + radii * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    img = img.copy()
    img[mask > 0] = rng.integers(0, 256, size=3).astype(np.uint8)
    return img, mask > 0


DEFECT_PAINTERS: dict[str, Callable] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "crack": _crack,
    "particle": _particle,
}


def _category_rng(seed: int, cat: str, part: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(cat.encode()), zlib.crc32(part.encode())])


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), arr):
        msg = f"could not write {path}"
        raise OSError(msg)


def generate_synthetic(
    out_root: str | os.PathLike,
    seed: int = 0,
    size: int = 128,
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_per_defect: int = 3,
    categories: Sequence[str] = SYNTHETIC_CATEGORIES,
) -> Path:
    """Write the synthetic dataset in MVTec layout under ``out_root`` and return it.

    Written into ``<out_root>.partial`` and renamed when complete, so an interrupted generation
    never leaves a tree that looks finished. The same arguments always give the same bytes.
    """
    out_root = Path(out_root)
    unknown = [c for c in categories if c not in SYNTHETIC_CATEGORIES]
    if unknown:
        msg = f"unknown synthetic categories {unknown}; available: {list(SYNTHETIC_CATEGORIES)}."
        raise ValueError(msg)
    if size < 32:
        msg = f"synthetic image size must be >= 32, got {size}."
        raise ValueError(msg)
    tmp = out_root.with_name(out_root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for cat in categories:
        if cat == "washer":
            _gen_washer(tmp / cat, seed, size, n_train, n_test_good, n_test_per_defect)
        else:
            _gen_texture(tmp / cat, cat, seed, size, n_train, n_test_good, n_test_per_defect)
    if out_root.exists():
        shutil.rmtree(out_root)
    os.replace(tmp, out_root)
    return out_root


def _gen_texture(root: Path, cat: str, seed: int, size: int, n_train: int, n_good: int, n_def: int) -> None:
    photo = _photo(cat)
    rng = _category_rng(seed, cat, "train")
    for i in range(n_train):
        _write(root / "train" / "good" / f"{i:03d}.png", _texture_image(photo, cat, size, rng))
    rng = _category_rng(seed, cat, "test")
    for i in range(n_good):
        _write(root / "test" / "good" / f"{i:03d}.png", _texture_image(photo, cat, size, rng))
    for defect, painter in DEFECT_PAINTERS.items():
        for i in range(n_def):
            img, mask = painter(_texture_image(photo, cat, size, rng), rng, {})
            _write(root / "test" / defect / f"{i:03d}.png", img)
            _write(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)


def _gen_washer(root: Path, seed: int, size: int, n_train: int, n_good: int, n_def: int) -> None:
    rng = _category_rng(seed, "washer", "train")
    for i in range(n_train):
        _write(root / "train" / "good" / f"{i:03d}.png", _washer_image(size, _washer_geometry(size, rng), rng))
    rng = _category_rng(seed, "washer", "test")
    for i in range(n_good):
        _write(root / "test" / "good" / f"{i:03d}.png", _washer_image(size, _washer_geometry(size, rng), rng))
    kinds = ["scratch", "stain", "particle", "missing_hole", "chipped_rim"]
    for defect in kinds:
        for i in range(n_def):
            geo = _washer_geometry(size, rng)
            if defect == "missing_hole":
                k = int(rng.integers(0, 6))
                img = _washer_image(size, geo, rng, skip_hole=k)
                yy, xx = np.mgrid[0:size, 0:size]
                hx, hy = geo["holes"][k]
                mask = np.hypot(xx - hx, yy - hy) <= geo["hole_r"]
            elif defect == "chipped_rim":
                img = _washer_image(size, geo, rng)
                yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
                a = rng.uniform(0, 2 * np.pi)
                edge = geo["center"] + geo["outer"] * np.array([np.cos(a), np.sin(a)])
                r_chip = rng.uniform(size / 20, size / 12)
                cx, cy = geo["center"]
                on_ring = np.hypot(xx - cx, yy - cy) >= geo["inner"]
                mask = (np.hypot(xx - edge[0], yy - edge[1]) <= r_chip) & on_ring
                mask &= np.hypot(xx - cx, yy - cy) <= geo["outer"]
                img = img.copy()
                img[mask] = (40, 44, 48)
            else:
                base = _washer_image(size, geo, rng)
                a = rng.uniform(0, 2 * np.pi)
                anchor = geo["center"] + (geo["outer"] + geo["inner"]) / 2 * np.array([np.cos(a), np.sin(a)])
                img, mask = DEFECT_PAINTERS[defect](base, rng, {"anchor": anchor})
            _write(root / "test" / defect / f"{i:03d}.png", img)
            _write(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
