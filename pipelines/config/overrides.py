"""``--set KEY=VALUE`` overrides on a raw params tree, and flattening a params tree to dotted keys."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

__all__ = ["OverrideError", "apply_overrides", "flatten", "set_dotted"]


class OverrideError(ValueError):
    """An override is not ``KEY=VALUE`` or its value is not YAML."""


def set_dotted(tree: Any, key: str, value: Any) -> None:
    """``tree["a"]["b"]["c"] = value`` for ``key="a.b.c"``, creating mappings on the way."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not hasattr(node.get(p), "keys"):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (values parsed as YAML) to a raw params tree."""
    for item in overrides or []:
        if "=" not in item:
            msg = f"--set expects KEY=VALUE, got {item!r}"
            raise OverrideError(msg)
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            msg = f"--set {key}: cannot parse value {raw!r} ({err})"
            raise OverrideError(msg) from err
        set_dotted(tree, key.strip(), value)
    return tree


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict → ``{"a.b.c": value}`` (lists kept as their string form)."""
    out: dict[str, Any] = {}
    if isinstance(tree, BaseModel):
        tree = tree.model_dump()
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = tree
    return out
