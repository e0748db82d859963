"""The noise record (``metrics/noise.json``), light enough for the registry to read."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipelines.config import Params
from pipelines.paths import METRICS_DIR

logger = logging.getLogger(__name__)

__all__ = ["NOISE_FILE", "min_gain", "noise_record", "scope_key"]

NOISE_FILE = METRICS_DIR / "noise.json"


def scope_key(p: Params) -> str:
    """The noise record's key: ``<dataset>/<setting>`` (what a champion is compared within)."""
    return f"{p.data.name}/{p.setting.kind}"


def noise_record(p: Params, path: Path = NOISE_FILE) -> dict[str, Any] | None:
    """The recorded noise floor of ``p``'s scope (``{"noise": {scope: record}}``), or None when none was measured."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["noise"].get(scope_key(p))
    except (ValueError, AttributeError, KeyError, TypeError):
        logger.warning("%s is not a noise record (JSON object of scopes); ignoring it.", path)
        return None


def min_gain(p: Params, path: Path = NOISE_FILE) -> tuple[float, str]:
    """The mAD gain a new version needs over the champion, and where it comes from:
    ``registry.min_gain`` when a number; ``auto``: ``registry.noise_multiple`` × the scope's
    measured std of the mAD (``inpformer noise``), or 0 when none was measured."""
    r = p.registry
    if r.min_gain != "auto":
        return float(r.min_gain), f"registry.min_gain={float(r.min_gain):g}"
    record = noise_record(p, path)
    std = (record or {}).get("std", {}).get("mad")
    if not isinstance(std, (int, float)) or std != std:
        return 0.0, "no noise floor measured for this scope (inpformer noise)"
    gain = r.noise_multiple * float(std)
    return gain, f"{r.noise_multiple:g} × the mAD std {float(std):.4f} over {record.get('k')} seeds"
