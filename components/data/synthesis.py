"""DRAEM-style pseudo anomalies for INP-Former++ residual learning (method spec §13.6).

Recipe (written from the spec's description of DRAEM's loader):
* texture: a random texture image (DTD when a folder is given, else a procedural bank) resized
  to the working size, then 3 of 10 augmenters chosen without replacement;
* mask: 2-D Perlin noise at resolution (2^a, 2^b), a, b ∈ {0..5}, rotated by U(−90°, 90°),
  thresholded at > 0.5;
* blend inside the mask: (1 − β)·texture + β·image, β ~ U(0, 0.8); unchanged outside;
* with probability ``empty_prob`` (0.5) the image is returned unmodified with an empty mask;
* with probability ``rotate_prob`` (0.3) the source image is first rotated by U(−90°, 90°).

Everything works on float32 H×W×3 arrays in [0, 1] *before* normalisation, and every random draw
comes from the ``numpy.random.Generator`` passed in, so the same seed gives the same bytes.
Perlin noise needs the side divisible by the resolution; we draw it on the next multiple and crop
(the spec's open point; DRAEM works at 256 where this never arises).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from components.data.io import is_image_file, read_rgb

__all__ = ["AUGMENTERS", "PseudoAnomalySynthesizer", "TextureBank", "perlin_mask", "rand_perlin_2d"]


def rand_perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise of ``shape`` with ``res`` lattice cells per axis; values roughly in [−1, 1]."""
    h, w = shape
    ry, rx = res
    hh, ww = -(-h // ry) * ry, -(-w // rx) * rx  # next multiples of the resolution
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.arange(hh) * ry / hh
    xs = np.arange(ww) * rx / ww
    yi, xi = ys.astype(int), xs.astype(int)
    fy, fx = ys - yi, xs - xi
    FY, FX = np.meshgrid(fy, fx, indexing="ij")
    YI, XI = np.meshgrid(yi, xi, indexing="ij")

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[YI + dy, XI + dx]
        return g[..., 0] * (FX - dx) + g[..., 1] * (FY - dy)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(FX), fade(FY)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    noise = np.sqrt(2.0) * (top * (1 - v) + bottom * v)
    return noise[:h, :w].astype(np.float32)


def _rotate(arr: np.ndarray, angle: float, border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    h, w = arr.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    return cv2.warpAffine(arr, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)


def perlin_mask(
    shape: tuple[int, int], rng: np.random.Generator, max_exponent: int = 6, threshold: float = 0.5
) -> np.ndarray:
    """Binary H×W float32 mask: rotated Perlin noise > threshold (spec §13.6)."""
    a, b = rng.integers(0, max_exponent, size=2)
    noise = rand_perlin_2d(shape, (2 ** int(a), 2 ** int(b)), rng)
    noise = _rotate(noise, float(rng.uniform(-90, 90)))
    return (noise > threshold).astype(np.float32)


# -- the 10 augmenters (spec §13.6); each maps uint8 H×W×3 → uint8 H×W×3 ------------------------
def _gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = rng.uniform(0.5, 2.0, size=3)
    return np.clip(255.0 * (img / 255.0) ** g, 0, 255).astype(np.uint8)


def _mul_add(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30), 0, 255).astype(np.uint8)


def _sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(rng.uniform(0.0, 2.0)))


def _hue_sat(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int32)
    dh, ds = rng.integers(-50, 51, size=2)
    hsv[..., 0] = (hsv[..., 0] + dh) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + ds, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return img
    t = rng.integers(32, 129)
    return np.where(img >= t, 255 - img, img).astype(np.uint8)


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.posterize(Image.fromarray(img), int(rng.integers(1, 9))))


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 - img).astype(np.uint8)


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.autocontrast(Image.fromarray(img)))


def _equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.equalize(Image.fromarray(img)))


def _affine_rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _rotate(img, float(rng.uniform(-45, 45)), border=cv2.BORDER_REFLECT)


AUGMENTERS = (
    _gamma,
    _mul_add,
    _sharpness,
    _hue_sat,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _affine_rotate,
)


def _procedural_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A coloured texture (Perlin octaves, stripes or checks): uint8 size×size×3."""
    kind = int(rng.integers(0, 3))
    if kind == 0:
        acc = np.zeros((size, size), np.float32)
        for octave in range(4):
            r = 2 ** (octave + 1)
            acc += rand_perlin_2d((size, size), (r, r), rng) / (octave + 1)
        base = (acc - acc.min()) / max(float(acc.max() - acc.min()), 1e-6)
    elif kind == 1:
        freq = rng.uniform(4, 24)
        y, x = np.mgrid[0:size, 0:size] / size
        ang = rng.uniform(0, np.pi)
        base = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(ang) + y * np.sin(ang)))
    else:
        cells = int(rng.integers(3, 16))
        y, x = np.mgrid[0:size, 0:size] * cells // size
        base = ((x + y) % 2).astype(np.float32)
    colours = rng.uniform(0, 255, size=(2, 3))
    img = colours[0] * base[..., None] + colours[1] * (1 - base[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


class TextureBank:
    """Texture source: image files under ``folder`` (e.g. DTD) or a procedural bank when None."""

    def __init__(self, folder: str | os.PathLike | None = None, procedural_size: int = 256) -> None:
        self.files: list[Path] = []
        if folder:
            root = Path(folder)
            if not root.is_dir():
                msg = f"texture folder {root} does not exist (or pass folder=None for procedural textures)."
                raise FileNotFoundError(msg)
            self.files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
            if not self.files:
                msg = f"texture folder {root} holds no images (.png/.jpg/...)."
                raise FileNotFoundError(msg)
        self.procedural_size = procedural_size

    @property
    def source(self) -> str:
        """``dtd:<n files>`` or ``procedural``."""
        return f"folder:{len(self.files)}" if self.files else "procedural"

    def sample(self, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A random texture resized to ``size`` (H, W): uint8 H×W×3."""
        if self.files:
            img = np.asarray(read_rgb(self.files[int(rng.integers(0, len(self.files)))]))
        else:
            img = _procedural_texture(self.procedural_size, rng)
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


@dataclass
class PseudoAnomalySynthesizer:
    """Callable ``(image [0,1] H×W×3, rng) → (anomalous image, mask H×W, has_anomaly)``.

    Args:
        textures: the texture source.
        empty_prob: probability of returning the image unchanged with an empty mask (0.5).
        beta_max: β ~ U(0, beta_max) is the weight of the *original* image inside the mask (0.8).
        num_augmenters: how many of the 10 augmenters are applied to the texture (3).
        max_perlin_exponent: resolutions 2^a with a < this (6 → {1..32}).
        threshold: Perlin threshold (0.5).
        rotate_prob: probability of rotating the source image by U(−90°, 90°) first (0.3).
    """

    textures: TextureBank
    empty_prob: float = 0.5
    beta_max: float = 0.8
    num_augmenters: int = 3
    max_perlin_exponent: int = 6
    threshold: float = 0.5
    rotate_prob: float = 0.3

    def __post_init__(self) -> None:
        if not 0 <= self.empty_prob <= 1 or not 0 <= self.beta_max <= 1 or not 0 <= self.rotate_prob <= 1:
            msg = "synthesis probabilities and beta_max must lie in [0, 1]."
            raise ValueError(msg)
        if not 0 <= self.num_augmenters <= len(AUGMENTERS):
            msg = f"num_augmenters must be in 0..{len(AUGMENTERS)}, got {self.num_augmenters}."
            raise ValueError(msg)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
        """image: float32 H×W×3 in [0, 1] → (image', mask float32 H×W in {0,1}, β or −1 if none)."""
        h, w = image.shape[:2]
        image = image.astype(np.float32)
        if rng.random() < self.rotate_prob:
            image = _rotate(image, float(rng.uniform(-90, 90)))
        if rng.random() < self.empty_prob:
            return image, np.zeros((h, w), np.float32), -1.0
        mask = perlin_mask((h, w), rng, self.max_perlin_exponent, self.threshold)
        texture = self.textures.sample((h, w), rng)
        for idx in rng.choice(len(AUGMENTERS), size=self.num_augmenters, replace=False):
            texture = AUGMENTERS[int(idx)](texture, rng)
        texture = texture.astype(np.float32) / 255.0
        beta = float(rng.uniform(0.0, self.beta_max))
        m = mask[..., None]
        out = image * (1 - m) + ((1 - beta) * texture + beta * image) * m
        if not mask.any():
            beta = -1.0
        return np.clip(out, 0.0, 1.0).astype(np.float32), mask, beta
