"""``inpformer evaluate``: metrics per category and their mean, reports, plots, MLflow and registry."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.data.datasets import ImageDataset, Record
from components.evaluation.metrics import METRIC_KEYS, evaluate_arrays, metric_set
from components.evaluation.plots import curve_tables, plot_curves, plot_examples, plot_histogram
from components.files import atomic_write_text, disk_full_as_error, exclusive_lock
from components.model import InpFormer
from components.scoring.decision import CategoryThresholds, calibrate
from components.scoring.drift import DriftReference
from components.scoring.inference import InferenceResult, ScoringConfig, predict
from components.scoring.package import ModelPackage, write_package
from pipelines.builders import (
    apply_cpu_policy,
    build_scoring,
    build_transform,
    check_memory,
    operating_point,
    resolve_device,
)
from pipelines.config import Params
from pipelines.paths import (
    ARTIFACTS,
    CURVES_DIR,
    EVAL_DIR,
    EVAL_RUN_FILE,
    METRICS_FILE,
    SCORED_MODELS_DIR,
    WORKSPACE_LOCK,
    calibrated_package_dir,
    remove_tree,
)
from pipelines.stages.drift_reference import drift_reference
from pipelines.stages.eval_checks import json_safe, pixel_known, pixel_truth, threshold_sanity
from pipelines.stages.records import data_hash, evaluation_records, load_records, manifest_hash, training_groups
from pipelines.stages.reporting import markdown_table
from pipelines.stages.scored_model import check_model_scope, snapshot_model, untested_categories
from pipelines.tracking.guard import tracking_failed
from pipelines.tracking.registry import log_and_register_model
from pipelines.tracking.runs import active_run_id, log_pipeline_metrics, safe_metric_name, tracked_run
from pipelines.view import report_coverage

logger = logging.getLogger(__name__)

EVAL_STAGING = ARTIFACTS / ".eval.partial"  # the evaluation's outputs until complete

__all__ = ["Evaluation", "check_model_scope", "check_test_split", "evaluate", "model_package", "untested_categories"]


@dataclass
class Evaluation:
    """What an evaluation found: metrics and thresholds per category, scoring per group."""

    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # group → its categories
    scoring: dict[str, ScoringConfig] = field(default_factory=dict)  # group → how its maps were made
    pretrained: dict[str, bool] = field(default_factory=dict)  # group → encoder pretrained
    packages: dict[str, ModelPackage] = field(default_factory=dict)  # group → the package of the scored weights
    model_dirs: dict[str, Path] = field(default_factory=dict)  # group → the snapshot scored (and registered)
    untested: list[str] = field(default_factory=list)  # categories without test images (eval.allow_untested)
    pixel_known: set[str] = field(default_factory=set)  # test images with a pixel ground truth
    f1: dict[str, tuple[float, float]] = field(default_factory=dict)  # category → F1 (image, pixel) thresholds
    drift: dict[str, DriftReference] = field(default_factory=dict)  # category → the scoring runs' reference

    def weights(self, group: str) -> str:
        """The SHA-256 of the weights scored for ``group`` (its snapshot's file)."""
        return self.packages[group].provenance.weights_sha256

    def metric_set(self, group: str) -> str:
        """What the group's mAD averages: ``image+pixel`` or ``image`` when every category agrees, else ``""``."""
        sets = {metric_set(self.per_category[c]) for c in self.groups[group]}
        return sets.pop() if len(sets) == 1 else ""

    def mean(self) -> dict[str, float]:
        """Mean over categories of each metric (NaN-skipping; NaN without categories)."""
        vals = list(self.per_category.values())
        return {k: _nanmean([v[k] for v in vals]) for k in METRIC_KEYS}


def _nanmean(values: list[float]) -> float:
    """The mean of the finite values (NaN when there is none: undefined for every category)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def evaluate(p: Params, progress: bool = True) -> dict[str, Any]:
    """Write ``metrics/metrics.json``, ``metrics/curves/`` and ``artifacts/eval/`` (CSV, Markdown,
    thresholds, plots); log to MLflow and register the models.

    The record is bound to the weights: under the workspace lock (no train meanwhile) each model
    folder is copied once; that copy is checked against the params and the manifest
    (:func:`check_model_scope`), scored, and registered, and its SHA-256 is written into
    ``metrics.json`` (``weights``), ``thresholds.json`` and the calibrated package.
    """
    with exclusive_lock(WORKSPACE_LOCK, "the workspace (artifacts/models, artifacts/eval)", p.limits.lock_wait_s):
        try:
            with disk_full_as_error(ARTIFACTS):
                return _evaluate(p, progress)
        finally:
            remove_tree(SCORED_MODELS_DIR)
            remove_tree(EVAL_STAGING)


def _evaluate(p: Params, progress: bool) -> dict[str, Any]:
    apply_cpu_policy(p)
    device = resolve_device(p.train.device)
    tf = build_transform(p)
    records = load_records(p)
    test = evaluation_records(p, records)
    check_test_split(p, test)
    cats = list(dict.fromkeys(r.category for r in test))
    untested = untested_categories(p, records, cats)
    staging = EVAL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "plots").mkdir(parents=True)
    (staging / "curves").mkdir()
    ev = Evaluation(groups={"all": cats} if p.setting.kind != "single_class" else {c: [c] for c in cats})
    ev.untested = untested
    ev.pixel_known = pixel_known(test)
    expected = training_groups(p, records)
    for group, group_cats in ev.groups.items():
        model, ev.packages[group], ev.model_dirs[group] = snapshot_model(p, group, device)
        check_memory(p, model, p.eval.batch_size, device, "eval.batch_size", training=False)
        if p.setting.kind != "zero_shot":
            check_model_scope(p, ev.packages[group], ev.model_dirs[group], expected.get(group, []))
        ev.scoring[group] = build_scoring(p, model.seg_head is not None)
        ev.pretrained[group] = ev.packages[group].encoder_pretrained
        for cat in group_cats:
            cat_test = [r for r in test if r.category == cat]
            coverage = report_coverage(p, cat, cat_test, tf)
            calib, scored = calibration_split(p, cat_test)
            ds = ImageDataset(scored, tf)
            res = _evaluate_category(p, model, ev.scoring[group], ev, ds, device, staging / "plots", progress)
            share = math.nan if coverage.share is None else coverage.share  # null in metrics.json: no masks
            ev.per_category[cat].update(mask_coverage=share, masks_outside=float(coverage.outside))
            found = _thresholds(p, model, ev.scoring[group], calib, res, device, progress, ev)
            ev.thresholds[cat] = {**found, "weights_sha256": ev.weights(group)}
            train = [r for r in records if r.category == cat and r.split == "train" and r.label == 0]
            ev.drift[cat] = drift_reference(p, model, train, res, tf, device)
    metrics: dict[str, Any] = {"mean": ev.mean(), "categories": ev.per_category}
    metrics["metric_set"] = {g: ev.metric_set(g) for g in ev.groups}  # what each group's mAD averages
    metrics["weights"] = {g: ev.weights(g) for g in ev.groups}  # the SHA-256 of the weights scored, per group
    if untested:
        metrics["untested"] = untested
    _write_reports(staging, ev)
    for group in ev.groups:
        write_package(staging / calibrated_package_dir(group).relative_to(EVAL_DIR), model_package(p, ev, group))
    _replace(staging / "curves", CURVES_DIR)
    _replace(staging, EVAL_DIR)
    atomic_write_text(METRICS_FILE, json.dumps(json_safe(metrics), indent=2))  # undefined: null
    _track(p, ev)
    pretrained = all(ev.pretrained.values())
    print(markdown_table(ev.per_category, metrics["mean"]))
    enc = "pretrained DINOv2" if pretrained else "RANDOM-INIT encoder (no DINOv2 weights: not comparable to the paper)"
    print(f"\nEncoder: {enc}. Metrics: {p.eval.metrics_mode}. Written: {METRICS_FILE}, {EVAL_DIR}/")
    return metrics


def check_test_split(p: Params, test: list[Record]) -> None:
    """An error when the test split cannot give metrics (empty, or no normal / no anomalous image);
    a warning naming the categories whose image-level metrics will be undefined (NaN)."""
    labels = {r.label for r in test}
    if labels != {0, 1}:
        what = "is empty" if not test else f"has no {'anomalous' if 1 not in labels else 'normal'} image"
        msg = (
            f"the test split of data.name={p.data.name} {what}: evaluation needs normal and anomalous test "
            "images (MVTec layout: <category>/test/good and <category>/test/<defect>). Add them and prepare again."
        )
        raise ValueError(msg)
    one_sided = sorted(c for c in {r.category for r in test} if len({r.label for r in test if r.category == c}) < 2)
    if one_sided:
        logger.warning(
            "categories %s have only normal or only anomalous test images: their image-level metrics are "
            "undefined (NaN) and left out of the means.",
            one_sided,
        )


def _thresholds(
    p: Params,
    model: InpFormer,
    scoring: ScoringConfig,
    calib: list[Record] | None,
    res: InferenceResult,
    device: str,
    progress: bool,
    ev: Evaluation,
) -> dict[str, Any]:
    """One category's thresholds from ``calib`` (held out), else from the scored images' ``res``
    (whose F1-optimal thresholds the metrics already found: ``ev.f1``)."""
    cat = res.categories[0]
    where, known = "test", ev.f1[cat]
    if calib:
        e, where, known = p.eval, "validation", None
        calib_ds = ImageDataset(calib, build_transform(p))
        res = predict(model, calib_ds, scoring, e.batch_size, device, 0, progress, p.train.progress_every_s)
    elif calib is not None:
        logger.warning("%s: too few test images to hold out; calibrating on the scored ones.", res.categories[:1])
    maps, masks = pixel_truth(res, ev.pixel_known)
    maps = res.maps if masks is None else maps  # without pixel truth: the normal images' pixel quantile
    found = calibrate(res.scores, res.labels, maps, masks, p.eval.threshold.fpr, known, operating_point(p)).to_dict()
    if found["review_threshold"] >= found["image_threshold"]:
        logger.warning(
            "%s: the review threshold (%s, %.6g) is not below the reject threshold (%s, %.6g): no image will be "
            "sent to review. Loosen eval.threshold.review_max_fpr / review_min_recall or change eval.threshold.rule.",
            cat,
            found["review_rule"],
            found["review_threshold"],
            found["rule"],
            found["image_threshold"],
        )
    threshold_sanity(p, cat, res.scores, res.labels, found["image_threshold"])
    return {**found, "rule": f"{found['rule']}@{where}"}


def calibration_split(p: Params, records: list[Record]) -> tuple[list[Record] | None, list[Record]]:
    """(calibration images or None, images to score) of one category (``eval.threshold``).

    ``split: test``: the thresholds come from the scored images themselves (None). ``validation``: a
    seeded share of each label's images (at least one left to score) calibrates and is not scored.
    """
    t = p.eval.threshold
    if t.split == "test":
        return None, records
    rng = random.Random(t.seed)
    calib: list[Record] = []
    for label in (0, 1):
        same = sorted((r for r in records if r.label == label), key=lambda r: r.path)
        rng.shuffle(same)
        calib += same[: min(len(same) - 1, max(1, round(len(same) * t.validation_fraction)))] if same else []
    held = {r.path for r in calib}
    return calib, [r for r in records if r.path not in held]


def _replace(staged: Path, target: Path) -> None:
    remove_tree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(target)


def _evaluate_category(
    p: Params,
    model: InpFormer,
    scoring: ScoringConfig,
    ev: Evaluation,
    ds: ImageDataset,
    device: str,
    plots_dir: Path,
    progress: bool,
) -> InferenceResult:
    """Score one category's test images; store its metrics and thresholds in ``ev``; plot."""
    recs = ds.records
    cat = recs[0].category
    e = p.eval
    res = predict(model, ds, scoring, e.batch_size, device, p.data.num_workers, progress, p.train.progress_every_s)
    maps, masks = pixel_truth(res, pixel_known(recs))  # images labelled without a mask: no pixel truth
    m = evaluate_arrays(res.scores, res.labels, maps, masks, e.metrics_mode, e.fpr_limit)
    ev.per_category[cat] = {k: m[k] for k in METRIC_KEYS}
    ev.f1[cat] = (m["image_threshold"], m["pixel_threshold"])
    safe = cat.replace("/", "_")
    for kind, columns in curve_tables(res.scores, res.labels, maps, masks, e.fpr_limit, e.curve_points).items():
        (plots_dir.parent / "curves" / kind).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(columns).to_csv(plots_dir.parent / "curves" / kind / f"{safe}.csv", index=False)
    if e.plots:
        plot_curves(plots_dir, safe, res.scores, res.labels, maps, masks, e.fpr_limit)
        plot_histogram(plots_dir / f"{safe}_scores.png", cat, res.scores, res.labels, m["image_threshold"])
        plot_examples(model, ds, res, plots_dir, safe, e.grid_images, device)
    return res


def _write_reports(folder: Path, ev: Evaluation) -> None:
    mean = ev.mean()
    atomic_write_text(folder / "thresholds.json", json.dumps(ev.thresholds, indent=2))
    rows = [{"category": c, **v} for c, v in ev.per_category.items()] + [{"category": "mean", **mean}]
    pd.DataFrame(rows).to_csv(folder / "metrics_per_category.csv", index=False)
    (folder / "metrics.md").write_text(markdown_table(ev.per_category, mean) + "\n")


def model_package(p: Params, ev: Evaluation, group: str) -> ModelPackage:
    """The package of the scored weights, calibrated: scoring and the group's thresholds."""
    thresholds = {c: CategoryThresholds.from_dict(ev.thresholds[c]) for c in ev.groups[group]}
    return ev.packages[group].calibrate(
        ev.scoring[group],
        thresholds,
        normalize=p.eval.threshold.normalize,
        threshold_split=p.eval.threshold.split,
        drift={c: ev.drift[c] for c in ev.groups[group] if c in ev.drift},
    )


def _track(p: Params, ev: Evaluation) -> None:
    """One MLflow run with the metrics, reports and plots; register each group's model."""
    mean = ev.mean()
    maps = ",".join({s.map_kind for s in ev.scoring.values()})
    tags = {"encoder_pretrained": all(ev.pretrained.values()), "map": maps, "manifest_hash": manifest_hash(p)}
    tags["data_hash"] = data_hash(p)  # the bytes scored and trained on (inpformer reproduce compares it)
    flat = dict(mean)
    for cat, vals in ev.per_category.items():
        flat.update({f"{safe_metric_name(cat)}/{k}": v for k, v in vals.items()})
    with tracked_run(p, "evaluate", "evaluate", tags, in_pipeline=True) as mlflow:
        mlflow.log_metrics({k: v for k, v in flat.items() if math.isfinite(v)})
        mlflow.log_artifact(str(METRICS_FILE))
        mlflow.log_artifacts(str(EVAL_DIR), artifact_path="eval")
        registry = {}
        if p.setting.kind != "zero_shot":
            for group, cats in ev.groups.items():
                gm = [ev.per_category[c]["mad"] for c in cats]
                mad = float(np.nanmean(gm)) if gm else math.nan
                package = model_package(p, ev, group)
                promote = not ev.untested  # documented rule: a partly tested model never becomes champion
                try:
                    registry[group] = log_and_register_model(
                        mlflow, p, ev.model_dirs[group], package, mad, group, promote, ev.metric_set(group)
                    )
                except Exception as err:  # the metrics are written already: a registry error only warns
                    tracking_failed(p, f"registering the model of {group}", err)
                    registry[group] = {"error": f"{type(err).__name__}: {err}"}
        run_id = active_run_id(mlflow)
        maps_info = {g: {"map": ev.scoring[g].map_kind, "encoder_pretrained": ev.pretrained[g]} for g in ev.groups}
        record = {"run_id": run_id, "registry": registry, "maps": maps_info}
        atomic_write_text(EVAL_RUN_FILE, json.dumps(record, indent=2, default=str))
        log_pipeline_metrics(p, flat)  # last: it completes this execution's parent run
