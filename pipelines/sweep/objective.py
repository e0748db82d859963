"""The Optuna objective: sampled params → the training of ``inpformer train`` → a validation score.

* Validation split: held-out training normals plus drawn anomalies (or the semi-supervised real
  ones), never the test set unless ``sweep.objective_split: test`` (the paper's protocol).
* Each trial trains exactly what ``inpformer train`` trains for the configured setting
  (:func:`pipelines.stages.training_data.training_dataset`).
* Pruning from per-epoch reports (median) or per-category results (Wilcoxon).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import optuna

from components.data.datasets import ImageDataset, Record
from components.data.tiling import tile_records
from components.data.validation import make_validation_split
from components.engine.training import train as train_model
from components.evaluation.metrics import evaluate_arrays
from components.files import atomic_write_text
from components.model import InpFormer
from components.scoring.inference import predict
from pipelines.builders import build_scoring, build_transform
from pipelines.config import Params, load_params
from pipelines.paths import SWEEP_DIR, TILE_CACHE_DIR
from pipelines.stages.records import evaluation_records, load_records, semi_supervised_anomalies
from pipelines.stages.training_data import assemble_training

__all__ = ["SweepRun", "build_objective", "cached_validation_split", "sample_overrides", "validation_split"]


@dataclass
class SweepRun:
    """What every worker of one sweep shares: the params, where they came from, and how to run."""

    params: Params
    params_path: str
    overrides: list[str]
    progress: bool = False
    pruner: optuna.pruners.BasePruner | None = None


def sample_overrides(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> list[str]:
    """Draw one value per search-space entry; return ``KEY=VALUE`` overrides."""
    out = []
    for key, spec in space.items():
        kind = spec.get("type", "float")
        if kind == "int":
            v: Any = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
        elif kind == "float":
            v = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
        elif kind == "categorical":
            v = trial.suggest_categorical(key, list(spec["choices"]))
        else:
            msg = f"sweep.space.{key}: type must be int, float or categorical, got {kind!r}"
            raise ValueError(msg)
        out.append(f"{key}={json.dumps(v) if isinstance(v, str) else v}")
    return out


def validation_split(p: Params) -> tuple[list[Record], list[Record]]:
    """(training records, validation records) of the objective (the test split only when asked)."""
    records = load_records(p)
    if p.sweep.objective_split == "test":
        warnings.warn("sweep.objective_split=test: tuning on the test set (the paper's protocol).", stacklevel=2)
        return [r for r in records if r.split == "train"], evaluation_records(p, records)
    reals = semi_supervised_anomalies(p, records) if p.setting.kind == "semi_supervised" else []
    return make_validation_split(records, p.sweep.validation_fraction, SWEEP_DIR / "validation", p.sweep.seed, reals)


def cached_validation_split(p: Params) -> tuple[list[Record], list[Record]]:
    """The validation split, built once per sweep (a JSON index shared by the workers)."""
    index = SWEEP_DIR / "validation.json"
    if index.is_file():
        data = json.loads(index.read_text())
        return [Record(**r) for r in data["train"]], [Record(**r) for r in data["val"]]
    train_recs, val = validation_split(p)
    atomic_write_text(index, json.dumps({"train": [asdict(r) for r in train_recs], "val": [asdict(r) for r in val]}))
    return train_recs, val


def _evaluate(model: InpFormer, val: list[Record], p: Params, device: str) -> dict[str, float]:
    """Per-category metric of ``p.sweep.metric`` on the validation records."""
    tf = build_transform(p)
    scoring = build_scoring(p, model.seg_head is not None)
    out = {}
    for cat in dict.fromkeys(r.category for r in val):
        recs = [r for r in val if r.category == cat]
        res = predict(model, ImageDataset(recs, tf), scoring, p.eval.batch_size, device, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = evaluate_arrays(res.scores, res.labels, res.maps, res.masks, p.eval.metrics_mode, p.eval.fpr_limit)
        out[cat] = float(m.get(p.sweep.metric, math.nan))
    return out


def build_objective(run: SweepRun, train_recs: list[Record], val: list[Record]):
    """The Optuna objective: train on ``train_recs`` with sampled params, score on ``val``."""
    base = run.params
    all_records = load_records(base)

    def objective(trial: optuna.Trial) -> float:
        trial_overrides = sample_overrides(trial, base.sweep.space)
        p = load_params(run.params_path, [*run.overrides, *trial_overrides])
        trial.set_user_attr("overrides", trial_overrides)
        tiles = tile_records(train_recs, build_transform(p), TILE_CACHE_DIR)  # as training_groups (tile geometry)
        job = assemble_training(p, tiles, all_records, run.progress)
        model, cfg = job.model, job.cfg
        wilcoxon = p.sweep.pruner == "wilcoxon"

        def on_epoch(m: dict[str, Any]) -> None:
            if wilcoxon or p.sweep.pruner == "none":
                return
            score = float(np.nanmean(list(_evaluate(model, val, p, cfg.device).values())))
            step = int(m["epoch"])
            trial.report(score, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", step)
                raise optuna.TrialPruned(f"pruned after epoch {step}")

        train_model(model, job.dataset, cfg, job.loss, job.dice, on_epoch=on_epoch)
        per_cat = _evaluate(model, val, p, cfg.device)
        if wilcoxon:
            for i, v in enumerate(per_cat.values()):
                trial.report(v, i)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"Wilcoxon-pruned after {i + 1} categories")
        trial.set_user_attr("per_category", per_cat)
        value = float(np.nanmean(list(per_cat.values())))
        if not math.isfinite(value):
            raise optuna.TrialPruned("objective is NaN (no anomalies in the validation split?)")
        return value

    return objective
