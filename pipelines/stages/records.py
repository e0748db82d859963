"""The records a stage works on: the configured dataset(s), training groups, test split, bank."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict

from components.data.datasets import Record, read_manifest
from components.data.semi import select_anomalies
from components.data.tiling import tile_records
from components.files import file_digest
from pipelines.builders import build_transform
from pipelines.config import Params
from pipelines.paths import TILE_CACHE_DIR, manifest_path, synth_index

logger = logging.getLogger(__name__)

DATA_HASH = "blake2b"  # of each data file (fast; the record keeps the SHA-256 of the list)

__all__ = [
    "data_hash",
    "evaluation_records",
    "load_records",
    "manifest_hash",
    "pseudo_anomaly_bank",
    "semi_supervised_anomalies",
    "training_groups",
]


def load_records(p: Params) -> list[Record]:
    """Manifest records of the configured dataset(s), filtered to the configured categories.

    With ``data.extra_sources`` (super-multi-class) categories are qualified as ``<dataset>/<category>``.
    """
    names = [p.data.name, *p.data.extra_sources]
    out: list[Record] = []
    for n in names:
        recs = read_manifest(manifest_path(n))
        if len(names) > 1:
            recs = [Record(r.path, f"{n}/{r.category}", r.split, r.label, r.mask_path, r.defect) for r in recs]
        out += recs
    if p.data.categories:
        wanted = set(p.data.categories)
        absent = wanted - {r.category for r in out}
        if absent:
            msg = f"data.categories {sorted(absent)} are not in the prepared data."
            raise ValueError(msg)
        out = [r for r in out if r.category in wanted]
    return out


def manifest_hash(p: Params) -> str:
    """A short digest of the manifests in use (recorded with every MLflow run)."""
    h = hashlib.sha256()
    for n in [p.data.name, *p.data.extra_sources]:
        h.update(manifest_path(n).read_bytes())
    return h.hexdigest()[:16]


def data_hash(p: Params) -> str:
    """A short digest of the data in use: the manifests and the bytes of every image and mask they
    list (recorded with every evaluation; ``inpformer reproduce`` compares it). Unlike
    :func:`manifest_hash` it sees an image edited in place, inside or outside the workspace."""
    h = hashlib.sha256()
    for n in [p.data.name, *p.data.extra_sources]:
        manifest = manifest_path(n)
        h.update(manifest.read_bytes())
        for r in read_manifest(manifest):
            for path in (r.path, r.mask_path):
                if path:
                    h.update(file_digest(path, DATA_HASH).encode())
    return h.hexdigest()[:16]


def training_groups(p: Params, records: list[Record]) -> dict[str, list[Record]]:
    """Training records per model: ``{"all": ...}``, or one group per category (single-class).

    Under ``data.geometry: tile`` a training image larger than a tile is replaced by its tiles.
    """
    train = tile_records([r for r in records if r.split == "train"], build_transform(p), TILE_CACHE_DIR)
    if p.setting.kind == "single_class":
        groups: dict[str, list[Record]] = defaultdict(list)
        for r in train:
            groups[r.category].append(r)
        return dict(groups)
    return {"all": train}


def semi_supervised_anomalies(p: Params, records: list[Record]) -> list[Record]:
    """The real anomalies the semi-supervised setting trains on (removed from the test split)."""
    return select_anomalies(records, p.setting.semi_supervised_n, seed=p.seed)


def evaluation_records(p: Params, records: list[Record]) -> list[Record]:
    """The test split, without the anomalies the semi-supervised setting trained on."""
    test = [r for r in records if r.split == "test"]
    if p.setting.kind == "semi_supervised":
        used = {r.path for r in semi_supervised_anomalies(p, records)}
        test = [r for r in test if r.path not in used]
    return test


def pseudo_anomaly_bank(p: Params, records: list[Record]) -> list[list[tuple[str, str]]] | None:
    """Per training record, its (image, mask) files in the fixed bank; None to synthesise on the fly."""
    index = synth_index(p.data.name)
    if p.synthesis.bank_copies <= 0 or not index.is_file():
        return None
    by_source: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in index.read_text().splitlines()[1:]:
        src, _copy, img, mask, _a = row.rsplit(",", 4)
        by_source[src].append((str(index.parent / img), str(index.parent / mask)))
    bank = [by_source.get(r.path, []) for r in records]
    if not all(bank):
        logger.warning("the pseudo-anomaly bank does not cover every training image: synthesising on the fly.")
        return None
    return bank
