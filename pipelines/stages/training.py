"""``inpformer train``: one model per group into ``artifacts/models/<group>/``, resumable."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from components.data.datasets import Record
from components.engine.checkpoint import save_model
from components.engine.distributed import DistContext, check_same_config, init_from_env
from components.engine.train_config import CheckpointSpec
from components.engine.training import train as train_model
from components.evaluation.coverage import mask_coverage
from components.files import atomic_write_text, exclusive_lock
from components.scoring.package import ModelPackage, Provenance
from pipelines.builders import apply_cpu_policy, build_transform, cpu_runtime, geometry, resolve_device
from pipelines.config import Params
from pipelines.paths import (
    ARTIFACTS,
    CHECKPOINTS_DIR,
    MODELS_DIR,
    TRAIN_HISTORY_FILE,
    TRAIN_METRICS_FILE,
    TRAIN_SUMMARY_FILE,
    WORKSPACE_LOCK,
    remove_tree,
)
from pipelines.stages.records import load_records, manifest_hash, training_groups
from pipelines.stages.training_data import assemble_training
from pipelines.tracking.runs import active_run_id, begin_pipeline_run, tracked_run

__all__ = ["config_hash", "train", "train_group"]

TIMING_KEYS = ("seconds", "resumed")  # in artifacts/train_summary.json only: they differ run to run

RUN_RECORD = "mlflow_run.json"  # in a checkpoint folder: the MLflow run that a resumed training continues
HASHED_SECTIONS = ("seed", "setting", "data", "synthesis", "model", "loss", "train")


def config_hash(p: Params) -> str:
    """Digest of everything that shapes the trained weights (names the checkpoint folder)."""
    dump = p.model_dump(mode="json")
    keys = {k: dump[k] for k in HASHED_SECTIONS}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def _run_record(folder: Path) -> str:
    """The MLflow run id recorded in a checkpoint folder by an earlier (interrupted) run, or ''."""
    try:
        return str(json.loads((folder / RUN_RECORD).read_text())["run_id"])
    except (OSError, ValueError, KeyError):
        return ""


def train(p: Params, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Train every group, then replace ``artifacts/models`` and write the summary atomically.

    An interrupted training resumes from its checkpoints and continues its MLflow runs (the parent
    and each group's), so the epoch curves stay whole.
    """
    apply_cpu_policy(p)
    ctx = init_from_env(resolve_device(p.train.device))
    check_same_config(ctx, json.dumps(p.model_dump(mode="json"), sort_keys=True))
    if not ctx.main:  # DDP: rank 0 tracks, checkpoints and writes; the others only train
        records = load_records(p)
        for group, recs in training_groups(p, records).items():
            train_group(p, group, recs, records, ARTIFACTS / ".models.partial" / group, False, resume, ctx)
        return {}
    with exclusive_lock(WORKSPACE_LOCK, "the workspace (artifacts/models, artifacts/eval)", p.limits.lock_wait_s):
        return _train_main(p, progress, resume, ctx)


def _train_main(p: Params, progress: bool, resume: bool, ctx: DistContext) -> dict[str, Any]:
    """Rank 0's training, under the workspace lock (no evaluate reads a half-replaced model)."""
    root = CHECKPOINTS_DIR / config_hash(p)
    parent = begin_pipeline_run(p, _run_record(root) if resume else "")  # evaluate logs under it too
    if parent:
        atomic_write_text(root / RUN_RECORD, json.dumps({"run_id": parent}))
    if p.setting.kind == "zero_shot":
        print("setting.kind=zero_shot: no training (evaluate uses setting.zero_shot_source).")
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        _write_summaries({"setting": "zero_shot", "groups": {}}, [])
        return {}
    records = load_records(p)
    staging = ARTIFACTS / ".models.partial"
    remove_tree(staging)
    summary: dict[str, Any] = {"setting": p.setting.kind, "groups": {}, "config_hash": config_hash(p)}
    history: list[dict[str, Any]] = []
    for group, recs in training_groups(p, records).items():
        row, group_history = train_group(p, group, recs, records, staging / group, progress, resume, ctx)
        summary["groups"][group] = row
        history += [{"group": group, **h} for h in group_history]
    remove_tree(MODELS_DIR)
    staging.rename(MODELS_DIR)
    _write_summaries(summary, history)
    shutil.rmtree(CHECKPOINTS_DIR / summary["config_hash"], ignore_errors=True)
    return summary


def _write_summaries(summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """``artifacts/train_summary.json`` (with wall times) and the versioned, deterministic
    ``metrics/train.json`` and ``metrics/train_history.csv``."""
    atomic_write_text(TRAIN_SUMMARY_FILE, json.dumps(summary, indent=2))
    groups = {g: {k: v for k, v in row.items() if k not in TIMING_KEYS} for g, row in summary["groups"].items()}
    atomic_write_text(TRAIN_METRICS_FILE, json.dumps({"setting": summary["setting"], "groups": groups}, indent=2))
    atomic_write_text(TRAIN_HISTORY_FILE, pd.DataFrame(history).to_csv(index=False) if history else "epoch\n")


class IterationLog:
    """Training that talks while it runs: MLflow step metrics (``train_iter_*``) every
    ``train.log_every`` iterations, and, without a progress bar (``dvc repro``, Prefect), one line
    every ``every_s`` seconds: iteration, rate, ETA and the running loss."""

    def __init__(self, group: str, mlflow: Any, every_s: float, quiet: bool) -> None:
        self.group, self.mlflow, self.every_s, self.quiet = group, mlflow, every_s, quiet
        self.start: tuple[float, int] | None = None
        self.last = 0.0

    def __call__(self, logs: dict[str, Any]) -> None:
        it, total = int(logs["iteration"]), int(logs["iterations"])
        self.mlflow.log_metrics({f"train_iter_{k}": float(v) for k, v in logs.items() if k in LOSS_LOGS}, step=it)
        now = time.monotonic()
        if self.start is None:
            self.start, self.last = (now, it - 1), now
        if self.quiet or (now - self.last < self.every_s and it < total):
            return
        self.last = now
        done = it - self.start[1]
        rate = done / max(now - self.start[0], 1e-9)
        eta = (total - it) / rate if rate > 0 else float("inf")
        print(
            f"[{self.group}] {logs['phase']} iteration {it}/{total} ({100 * it / max(total, 1):.0f} %), "
            f"{rate:.2f} it/s, ETA {eta:.0f} s, loss {logs['total']:.4f}",
            flush=True,
        )


LOSS_LOGS = ("total", "cos", "mse", "coherence", "seg", "lr")


def train_group(
    p: Params,
    group: str,
    recs: list[Record],
    records: list[Record],
    out: Path,
    progress: bool,
    resume: bool,
    ctx: DistContext | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train the model of one group into ``out``; return its summary row and per-epoch history.

    Under DDP (``ctx``) every rank calls this; rank 0 builds the feature cache first (the others
    wait, then read it), and alone tracks and writes the model.
    """
    ctx = ctx or DistContext()
    job = assemble_training(p, recs, records, progress, ctx)
    model = job.model
    package = ModelPackage(
        model=model.config,
        resize=p.data.image_size,
        geometry=geometry(p),
        tile=p.data.tile_size,
        tile_overlap=p.data.tile_overlap,
        categories=tuple(sorted({r.category for r in recs})),
        group=group,
        dataset=p.data.name,
        setting=p.setting.kind,
        encoder_pretrained=model.pretrained_loaded,
        encoder_weights_source=model.encoder.weights_source,
        provenance=Provenance(manifest_hash=manifest_hash(p), params_hash=config_hash(p)),
    )
    checkpoints = CheckpointSpec(CHECKPOINTS_DIR / config_hash(p) / group, package, resume, p.train.keep_checkpoints)
    if not ctx.main:
        train_model(model, job.dataset, job.cfg, job.loss, job.dice, checkpoints)
        return {}, []
    transform = build_transform(p)
    for cat in package.categories:  # before hours of training: how much of the defects the model will see
        masks = [r.mask_path for r in records if r.category == cat and r.split == "test" and r.mask_path]
        cov = mask_coverage(masks, transform)
        if cov.share is not None:
            print(
                f"[{group}] {cat}: field of view ({transform.geometry}) holds {100 * cov.share:.1f} % of the test "
                f"defect pixels; {cov.outside} of {cov.images} masked defect images lie wholly outside it"
            )
    tags = {"group": group, "encoder_pretrained": model.pretrained_loaded, "manifest_hash": manifest_hash(p)}
    tags.update(cpu_runtime())  # which CPU arithmetic produced these bits
    if ctx.active:
        tags["ranks"] = ctx.world
    previous = _run_record(checkpoints.folder) if resume else ""
    with tracked_run(p, "train", f"train-{group}", tags, in_pipeline=True, run_id=previous) as mlflow:
        run_id = active_run_id(mlflow)
        if run_id:
            atomic_write_text(checkpoints.folder / RUN_RECORD, json.dumps({"run_id": run_id}))
        if not previous:
            mlflow.log_params({"encoder_pretrained": model.pretrained_loaded, "n_train_images": len(job.dataset)})

        def on_epoch(m: dict[str, Any]) -> None:
            epoch_metrics = {f"train_{k}": v for k, v in m.items() if isinstance(v, float)}
            mlflow.log_metrics(epoch_metrics, step=int(m["epoch"]))

        talk = IterationLog(group, mlflow, p.train.progress_every_s, quiet=progress)
        result = train_model(
            model, job.dataset, job.cfg, job.loss, job.dice, checkpoints, on_epoch=on_epoch, on_iteration=talk
        )
        save_model(out, model, package)
        mlflow.log_metrics({"train_seconds": result.seconds})
    resumed = (" (resumed)" if result.resumed else "") + (f" on {ctx.world} ranks" if ctx.active else "")
    print(
        f"[{group}] {len(job.dataset)} images, {result.iterations} iterations, {result.seconds:.1f}s{resumed}; "
        f"encoder pretrained: {model.pretrained_loaded}"
    )
    row = {
        "images": len(job.dataset),
        "iterations": result.iterations,
        "seconds": round(result.seconds, 2),
        "resumed": result.resumed,
        "final_loss": result.history[-1].get("total") if result.history else None,
        "encoder_pretrained": model.pretrained_loaded,
    }
    return row, result.history
