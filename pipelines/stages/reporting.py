"""Plain-text and Markdown tables printed and written by the stages."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any

from components.data.datasets import Record
from components.evaluation.coverage import Coverage
from components.evaluation.metrics import METRIC_KEYS

__all__ = ["count_table", "format_table", "markdown_table"]

METRIC_HEADINGS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD")


def count_table(
    records: list[Record], empty_masks: Collection[str] = (), coverage: Mapping[str, Coverage] | None = None
) -> list[dict[str, Any]]:
    """Rows of category | train good | test good | test anomalous (+ a total row); with an
    ``empty_mask`` column (anomalous images whose mask marks nothing) when there are any, and with
    ``coverage``: the % of each category's test defect pixels in the model's view and the number of
    masked defect images wholly outside it (``-`` without masks)."""
    c = Counter((r.category, r.split, r.label) for r in records)
    empty = Counter(r.category for r in records if r.mask_path and r.mask_path in set(empty_masks))
    cats = list(dict.fromkeys(r.category for r in records))
    rows = [
        {
            "category": k,
            "train_good": c[(k, "train", 0)],
            "test_good": c[(k, "test", 0)],
            "test_anomalous": c[(k, "test", 1)],
            **({"empty_mask": empty[k]} if empty else {}),
        }
        for k in cats
    ]
    rows.append({k: (sum(r[k] for r in rows) if k != "category" else "total") for k in rows[0]} if rows else {})
    if coverage is not None and rows:
        for row in rows:
            cov = coverage.get(row["category"])
            known = cov is not None and cov.share is not None
            row["coverage_%"] = round(100 * cov.share, 1) if known else "-"  # type: ignore[union-attr]
            row["outside_view"] = cov.outside if known else "-"  # type: ignore[union-attr]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain fixed-width table."""
    if not rows:
        return "(empty)"
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    line = "  ".join(k.ljust(width[k]) for k in keys)
    body = [
        "  ".join(str(r[k]).rjust(width[k]) if k != "category" else str(r[k]).ljust(width[k]) for k in keys)
        for r in rows
    ]
    return "\n".join([line, "-" * len(line), *body])


def markdown_table(per_cat: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """Paper-style table in percent: rows categories + mean; I-AUROC … AUPRO, mAD."""

    def fmt(v: float) -> str:
        return f"{100 * v:.1f}" if math.isfinite(v) else "–"

    lines = ["| Category | " + " | ".join(METRIC_HEADINGS) + " |", "|---|" + "---:|" * len(METRIC_HEADINGS)]
    for cat, vals in [*per_cat.items(), ("**mean**", mean)]:
        lines.append(f"| {cat} | " + " | ".join(fmt(vals[k]) for k in METRIC_KEYS) + " |")
    return "\n".join(lines)
