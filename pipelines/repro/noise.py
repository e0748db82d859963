"""``inpformer noise``: the noise floor of one config, measured by training it with k seeds.

Each seed trains every group exactly as the train stage does (:func:`assemble_training`) and scores
the images the evaluate stage scores with the same metric code, in memory: the workspace's models,
metrics and MLflow runs are untouched. The base seed (``seed`` in params) reproduces the evaluate
stage's metrics. The result (mean, sample std per metric over seeds) is written per scope (dataset
and setting) into ``metrics/noise.json``, which ``dvc exp show`` and ``dvc metrics show`` list, and
logged to MLflow. The champion gate uses it (``registry.min_gain: auto``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.data.datasets import ImageDataset
from components.engine.training import train as train_model
from components.evaluation.metrics import METRIC_KEYS, evaluate_arrays
from components.files import atomic_write_text
from components.scoring.inference import predict
from pipelines.builders import apply_cpu_policy, build_scoring, build_transform, cpu_runtime
from pipelines.config import Params
from pipelines.repro.record import NOISE_FILE, scope_key
from pipelines.stages.eval_checks import json_safe, pixel_known, pixel_truth
from pipelines.stages.evaluation import calibration_split
from pipelines.stages.records import evaluation_records, load_records, training_groups
from pipelines.stages.training import config_hash
from pipelines.stages.training_data import assemble_training
from pipelines.tracking.runs import tracked_run

logger = logging.getLogger(__name__)

__all__ = ["measure_noise"]


def _seed_metrics(p: Params, progress: bool) -> dict[str, dict[str, float]]:
    """Train every group of ``p`` in memory and score its categories as the evaluate stage does."""
    records = load_records(p)
    test = evaluation_records(p, records)
    tf = build_transform(p)
    per_category: dict[str, dict[str, float]] = {}
    for group, recs in training_groups(p, records).items():
        job = assemble_training(p, recs, records, progress)
        train_model(job.model, job.dataset, job.cfg, job.loss, job.dice)
        scoring = build_scoring(p, job.model.seg_head is not None)
        cats = [group] if p.setting.kind == "single_class" else list(dict.fromkeys(r.category for r in test))
        for cat in cats:
            _calib, scored = calibration_split(p, [r for r in test if r.category == cat])
            if not scored:
                continue
            e = p.eval
            res = predict(job.model, ImageDataset(scored, tf), scoring, e.batch_size, job.cfg.device, 0, progress)
            maps, masks = pixel_truth(res, pixel_known(scored))
            m = evaluate_arrays(res.scores, res.labels, maps, masks, e.metrics_mode, e.fpr_limit)
            per_category[cat] = {k: float(m[k]) for k in METRIC_KEYS}
    return per_category


def _mean_over_categories(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in METRIC_KEYS:
        finite = [v[k] for v in per_category.values() if math.isfinite(v[k])]
        out[k] = float(np.mean(finite)) if finite else math.nan
    return out


def measure_noise(p: Params, seeds: int, progress: bool = False, path: Path = NOISE_FILE) -> dict[str, Any]:
    """Train ``seeds`` seeds (``seed``, ``seed + 1``, …) of ``p``; write and return the scope's record."""
    if seeds < 2:
        raise ValueError(f"--seeds {seeds}: a standard deviation needs at least 2 seeds (3 or more is better).")
    apply_cpu_policy(p)
    runs = []
    for i in range(seeds):
        q = p.model_copy(update={"seed": p.seed + i}, deep=True)
        started = time.monotonic()
        mean = _mean_over_categories(_seed_metrics(q, progress))
        runs.append({"seed": q.seed, "mean": mean})
        print(f"seed {q.seed}: mAD {mean['mad']:.4f} ({time.monotonic() - started:.0f} s)", flush=True)
    table = np.array([[r["mean"][k] for k in METRIC_KEYS] for r in runs], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mean = dict(zip(METRIC_KEYS, np.nanmean(table, axis=0).tolist(), strict=True))
        std = dict(zip(METRIC_KEYS, np.nanstd(table, axis=0, ddof=1).tolist(), strict=True))
    record = {
        "k": seeds,
        "seeds": [r["seed"] for r in runs],
        "params_hash": config_hash(p),
        "num_threads": p.train.num_threads,
        "mean": mean,
        "std": std,
        "runs": runs,
    }
    _write(path, scope_key(p), record)
    _track(p, record)
    print(_table(record))
    return record


def _write(path: Path, key: str, record: dict[str, Any]) -> None:
    """Merge the scope's record (without the per-seed runs: MLflow keeps those) into ``path``."""
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text()).get("noise", {})
        except (ValueError, AttributeError):
            data = {}
    data[key] = {k: v for k, v in record.items() if k != "runs"}
    atomic_write_text(path, json.dumps(json_safe({"noise": data}), indent=2, sort_keys=True) + "\n")


def _track(p: Params, record: dict[str, Any]) -> None:
    tags = {"scope": scope_key(p), "k": record["k"], **cpu_runtime()}
    with tracked_run(p, "noise", f"noise-{scope_key(p).replace('/', '-')}", tags) as mlflow:
        values = {f"{k}_mean": v for k, v in record["mean"].items()} | {f"{k}_std": v for k, v in record["std"].items()}
        mlflow.log_metrics({k: v for k, v in values.items() if math.isfinite(v)})
        mlflow.log_dict(json_safe(record), "noise.json")  # with the per-seed metrics


def _table(record: dict[str, Any]) -> str:
    lines = [f"noise floor over {record['k']} seeds {record['seeds']} (mean ± sample std):"]
    for k in METRIC_KEYS:
        m, s = record["mean"][k], record["std"][k]
        lines.append(f"  {k:<14} {m:.4f} ± {s:.4f}" if math.isfinite(m) else f"  {k:<14} undefined")
    return "\n".join(lines)
