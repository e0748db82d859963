"""The strict schema of a model package's JSON: every key of its type, every size bounded.

A model file (package.json, an exported file's metadata, a pre-package config.json) is untrusted
input: ``"false"`` is not a bool, a string is not a number, and no size may make this process
allocate more than the caller's bound. Each error names the file and the key.
"""

from __future__ import annotations

import math
import types
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.scoring.package import ModelPackage

__all__ = ["DEFAULT_MAX_SIDE", "MODEL_INT_BOUNDS", "PackageError", "check_bounds", "check_types"]

DEFAULT_MAX_SIDE = 2048  # default bound on any input/map side a model file may ask for (callers pass theirs)
MIN_SIDE = 14  # one ViT patch
# Bounds on the architecture's integers: a model file is untrusted input, and these sizes allocate memory.
MODEL_INT_BOUNDS = {
    "num_prototypes": (1, 1024),
    "decoder_depth": (1, 64),
    "extractor_depth": (1, 64),
    "num_heads": (1, 64),
    "seg_head_channels": (1, 4096),
}
GROUP_INDEX_MAX = 64  # encoder/decoder group and tap indices


class PackageError(ValueError):
    """A package JSON that cannot describe a model; the message names the file and the key."""


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(args[0])}" if len(args) == 2 and args[1] is Ellipsis else "a list"
    if origin is dict:
        return "an object"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type ``hint`` exactly (no truthy strings, no bools as numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _fits(v, args[1]) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_types(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> None:
    """Every key of ``data`` has the type of ``cls``'s dataclass field of that name; unknown keys
    are left to the caller. Raises :class:`PackageError` naming ``where`` and the key."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key in hints and not _fits(value, hints[key]):
            raise PackageError(f"{where}: '{prefix}{key}' must be {_describe(hints[key])}, got {value!r}.")


def check_bounds(package: ModelPackage, where: str, max_side: int = DEFAULT_MAX_SIDE) -> None:
    """Sizes a model file may ask for: every side in [14, ``max_side``], architecture integers in
    :data:`MODEL_INT_BOUNDS`. Raises :class:`PackageError` naming the key and the bound."""
    sides = {"resize": package.resize}
    if package.tile:
        sides["tile"] = package.tile
    size = package.model.image_size
    sides["image_size' of 'model"] = max(size) if isinstance(size, tuple) else size
    if package.scoring is not None and package.scoring.resize is not None:
        sides["resize' of 'scoring"] = package.scoring.resize
    for key, side in sides.items():
        if not MIN_SIDE <= side <= max_side:
            msg = (
                f"{where}: '{key}' is {side}, outside [{MIN_SIDE}, {max_side}] "
                "(the bound on what a model file may make this process allocate)."
            )
            raise PackageError(msg)
    config = package.model
    for key, (low, high) in MODEL_INT_BOUNDS.items():
        value = getattr(config, key)
        if value is not None and not low <= value <= high:
            raise PackageError(f"{where}: '{key}' of 'model' is {value}, outside [{low}, {high}].")
    scoring = package.scoring
    if scoring is not None and not (
        scoring.blur_kernel >= 0 and 0 < scoring.blur_sigma < math.inf and 0 < scoring.top_ratio <= 1
    ):
        msg = (
            f"{where}: 'scoring' needs blur_kernel >= 0, 0 < blur_sigma < inf and 0 < top_ratio <= 1, got "
            f"{scoring.blur_kernel}, {scoring.blur_sigma}, {scoring.top_ratio}."
        )
        raise PackageError(msg)
    if not (0 < config.mlp_ratio < math.inf and 0 < config.norm_eps < 1):
        raise PackageError(f"{where}: 'model' needs 0 < mlp_ratio < inf and 0 < norm_eps < 1.")
    indices = [i for g in (*config.encoder_groups, *config.decoder_groups) for i in g] + list(config.taps or ())
    if any(not 0 <= i <= GROUP_INDEX_MAX for i in indices):
        raise PackageError(f"{where}: a layer index of 'model' groups/taps is outside [0, {GROUP_INDEX_MAX}].")
