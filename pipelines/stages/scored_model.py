"""The model an evaluation scores: one snapshot of its folder (scored and registered, whatever
happens to the folder meanwhile), checked against the params and the manifest it is evaluated on."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from components.data.datasets import Record
from components.engine.checkpoint import WEIGHTS_FILE, load_model
from components.files import file_digest
from components.model import InpFormer
from components.scoring.package import ModelPackage
from pipelines.config import Params
from pipelines.paths import MODELS_DIR, SCORED_MODELS_DIR, remove_tree
from pipelines.stages.records import manifest_hash

logger = logging.getLogger(__name__)

__all__ = ["check_model_scope", "snapshot_model", "untested_categories"]


def snapshot_model(p: Params, group: str, device: str) -> tuple[InpFormer, ModelPackage, Path]:
    """(model, its package with the digest of the bytes loaded, the snapshot folder they came from).

    The folder is copied first and everything (loading, scoring, registering) uses the copy, so a
    model folder replaced meanwhile can never be registered with these metrics.
    """
    src = MODELS_DIR / group
    if p.setting.kind == "zero_shot":
        src = Path(p.setting.zero_shot_source) if p.setting.zero_shot_source else Path()
        if not p.setting.zero_shot_source or not src.is_dir():
            msg = (
                "setting.zero_shot_source must name a trained model folder "
                "(artifacts/models/all of the source dataset)."
            )
            raise FileNotFoundError(msg)
    if not src.is_dir():
        msg = f"{src}: no trained model of group {group!r}; run `inpformer train` (or `dvc repro`) first."
        raise FileNotFoundError(msg)
    snapshot = SCORED_MODELS_DIR / group
    remove_tree(snapshot)
    shutil.copytree(src, snapshot)
    model, package = load_model(snapshot, device, p.limits.max_model_side)  # verifies the copy's digest.json
    held = file_digest(snapshot / WEIGHTS_FILE)
    return model, replace(package, provenance=replace(package.provenance, weights_sha256=held)), snapshot


def check_model_scope(p: Params, package: ModelPackage, folder: Path, train: list[Record]) -> None:
    """Refuse to evaluate (and register) a model trained for another dataset, setting or categories
    than the params and the manifest say: e.g. the previous model left by a failed ``train``."""
    expected = {
        "dataset": p.data.name,
        "setting": p.setting.kind,
        "categories": tuple(sorted({r.category for r in train})),
    }
    found = {"dataset": package.dataset, "setting": package.setting, "categories": tuple(sorted(package.categories))}
    wrong = [k for k in expected if found[k] != expected[k]]
    if wrong:
        diffs = "; ".join(f"{k}: the model has {found[k]!r}, the params/manifest say {expected[k]!r}" for k in wrong)
        msg = (
            f"{folder.name}: the model in {MODELS_DIR / folder.name} was not trained for this evaluation ({diffs}). "
            "Train it for these params first (`inpformer train` with the same --set, or `dvc repro`); "
            "a failed or interrupted train leaves the previous model in place."
        )
        raise ValueError(msg)
    recorded = package.provenance.manifest_hash
    if recorded and recorded != manifest_hash(p):
        logger.warning(
            "%s was trained on another version of the manifest of %s (%s, now %s): its training images changed since.",
            MODELS_DIR / folder.name,
            p.data.name,
            recorded,
            manifest_hash(p),
        )


def untested_categories(p: Params, records: list[Record], tested: list[str]) -> list[str]:
    """Categories of the data without test images: an error unless ``eval.allow_untested``; then
    they are reported (``untested`` in metrics.json) and their group is registered but never
    promoted (its mean covers only some of its categories)."""
    allowed = p.eval.allow_untested
    if p.setting.kind == "zero_shot":
        return []
    missing = sorted({r.category for r in records} - set(tested))
    if missing and not allowed:
        msg = (
            f"categories {missing} of data.name={p.data.name} have no test images: their metrics would be "
            "silently missing from the means and the promotion. Add test images (<category>/test/...), leave "
            "them out with data.categories, or set eval.allow_untested=true (reported; the model is then not promoted)."
        )
        raise ValueError(msg)
    if missing:
        logger.warning(
            "categories %s have no test images: reported as untested; the model will not be promoted.", missing
        )
    return missing
