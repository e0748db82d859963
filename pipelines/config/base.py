"""The strict base of every params section, and the validated types they share (pipelines/config/params.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "SEED_MAX",
    "SETTING_KINDS",
    "ConfigError",
    "Device",
    "Seed",
    "Slug",
    "StrictParams",
    "check_device",
    "check_slug",
]

SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # names that become folder names: no separators


def check_slug(value: str) -> str:
    """A name that becomes a folder (dataset, study): letters, digits, ``_ . -``; never ``..`` or a path."""
    if not SLUG.fullmatch(value) or ".." in value:
        msg = f"{value!r} is not a safe name: use letters, digits, '_', '.', '-' (no '/', no '..', at most 100)"
        raise ValueError(msg)
    return value


Slug = Annotated[str, AfterValidator(check_slug)]


def check_device(value: str) -> str:
    """A torch device name: ``auto`` (CUDA when available), ``cpu``, ``mps`` or ``cuda[:N]``."""
    if value not in ("auto", "cpu", "mps") and not value.startswith("cuda"):
        msg = f"device must be auto, cpu, mps or cuda[:N], got {value!r}"
        raise ValueError(msg)
    return value


Device = Annotated[str, AfterValidator(check_device)]

SEED_MAX = 2**32 - 1  # numpy's seed range
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]

SETTING_KINDS = ("single_class", "multi_class", "super_multi_class", "few_shot", "semi_supervised", "zero_shot")


class ConfigError(ValueError):
    """params.yaml or an override is invalid; the message names the key."""


class StrictParams(BaseModel):
    """Unknown keys, non-finite floats and booleans where numbers are expected are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        field = cls.model_fields[info.field_name]
        if isinstance(value, bool) and field.annotation in (int, float):
            msg = f"expected a number, got the boolean {value!r}"
            raise ValueError(msg)
        return value
