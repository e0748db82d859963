"""``inpformer benchmark``: deployment figures of one model per runtime, measured side by side in one run.

Rows: eager PyTorch fp32, eager bf16 autocast (only where the CPU has native bf16: AVX512-BF16 or
AMX; else the row says so), TorchScript, ONNX Runtime f32 and INT8, OpenVINO f32 and INT8 (both INT8
rows in the export's ``export.int8_mode``), each built into a temporary folder from the same model. Columns:
batch-1 latency p50 / p95 / p99 over ``--runs`` calls after ``WARMUP`` calls, throughput at batch
``THROUGHPUT_BATCH`` (images/s), the process's peak RSS after that runtime ran (Linux VmHWM, reset
before each row; it includes what earlier rows still hold, so it bounds rather than isolates a
runtime's memory), the artifact's file size, and agreement with eager on ``export.parity_images`` evaluation images
(decisions at each category's threshold, max |score difference|). Parameters and GFLOPs per image
(``torch.utils.flop_counter``) are the model's, printed once. Written to
``artifacts/benchmark/benchmark.{json,md}`` and logged to MLflow (a run of ``<experiment>-benchmark``
with the model version as a tag, each row's figures as ``<runtime>.<column>`` metrics, both files as
artifacts); a registered version also gets the tags ``inpformer.benchmark_run`` and
``inpformer.p50_ms`` (eager, batch 1). The promotion gate's latency check times with :func:`timed`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.files import atomic_write_text
from components.scoring.export import FORMATS, export_model, load_exported
from components.scoring.inference import score_batch
from components.scoring.onnx_int8 import quantize_onnx
from components.scoring.openvino_ir import onnx_to_ir
from components.scoring.scorer import LoadedModel
from pipelines import cpu_flags
from pipelines.config import Params
from pipelines.paths import ARTIFACTS
from pipelines.serve.export import evaluation_batch
from pipelines.serve.int8 import calibration_images
from pipelines.serve.predict import open_model

__all__ = ["BENCH_DIR", "benchmark", "gflops", "log_benchmark", "timed"]

BENCH_DIR = ARTIFACTS / "benchmark"
WARMUP, THROUGHPUT_BATCH, THROUGHPUT_RUNS = 3, 8, 3
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIB = 2**20
ONNX_FILE = "scorer" + FORMATS["onnx"]
BENCHMARK_SUFFIX = "-benchmark"
LOGGED = ("p50_ms", "p95_ms", "p99_ms", "images_per_s", "peak_rss_mib", "file_mib", "agreement", "max_score_diff")


def gflops(model: LoadedModel) -> float:
    """GFLOPs of scoring one image (model and post-processing) by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    side = model.transform.crop
    params = list(model.model.parameters())
    wanted = [t.requires_grad for t in params]
    counter = FlopCounterMode(display=False)
    try:  # the counter's module tracker hooks autograd: no parameter may want a gradient under no_grad
        for t in params:
            t.requires_grad_(False)
        with counter:
            score_batch(model.model, torch.zeros(1, 3, side, side), model.scoring)
    finally:
        for t, w in zip(params, wanted):
            t.requires_grad_(w)
    return counter.get_total_flops() / 1e9


def _peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _peak_rss_mib() -> float:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    except (OSError, StopIteration):
        return float("nan")
    return int(line.split()[1]) * 1024 / MIB


def _has_bf16() -> bool:
    return any(f in cpu_flags() for f in BF16_FLAGS)


def timed(
    run: Callable[[torch.Tensor], Any], images: torch.Tensor, runs: int, throughput: bool = True
) -> dict[str, float]:
    """Batch-1 latency p50/p95/p99 (ms) over ``runs`` calls after ``WARMUP`` calls, and (with
    ``throughput``) the median images/s at batch ``THROUGHPUT_BATCH`` (``images`` repeated to fill it)."""
    one = images[:1]
    for _ in range(WARMUP):
        run(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(one)
        times.append((time.perf_counter() - start) * 1000.0)
    q = np.percentile(times, [50, 95, 99])
    latency = {"p50_ms": float(q[0]), "p95_ms": float(q[1]), "p99_ms": float(q[2])}
    if not throughput:
        return latency
    batch = images[:THROUGHPUT_BATCH].repeat((THROUGHPUT_BATCH + len(images) - 1) // len(images), 1, 1, 1)[
        :THROUGHPUT_BATCH
    ]
    rates = []
    for _ in range(THROUGHPUT_RUNS):
        start = time.perf_counter()
        run(batch)
        rates.append(THROUGHPUT_BATCH / (time.perf_counter() - start))
    return {**latency, "images_per_s": statistics.median(rates)}


def _runtimes(p: Params, model: LoadedModel, folder: Path, images: torch.Tensor) -> list[tuple[str, Any, Path | None]]:
    """(name, scorer or a reason it is skipped, its file) for every row."""
    eager = model.scorer

    def bf16(x: torch.Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return eager(x)

    rows: list[tuple[str, Any, Path | None]] = [("eager fp32", eager, None)]
    rows.append(("eager bf16", bf16 if _has_bf16() else "no native bf16 on this CPU (AVX512-BF16/AMX)", None))
    meta = {"package": model.package.to_dict(), "version": model.version}
    for name, file, runtime in (
        ("torchscript", "scorer" + FORMATS["torchscript"], "onnxruntime"),
        ("onnxruntime", ONNX_FILE, "onnxruntime"),
    ):
        path = folder / file
        export_model(model.model, model.scoring, meta, path, images[:2], p.export.opset, True)
        rows.append((name, load_exported(path, "cpu", runtime), path))
    mode = p.export.int8_mode
    calibration = calibration_images(p, model) if mode == "full" else None  # training normals, as the export
    quantize_onnx(folder / ONNX_FILE, folder / "int8.onnx", mode, calibration)
    rows.append(
        (f"onnxruntime int8 ({mode})", load_exported(folder / "int8.onnx", "cpu", "onnxruntime"), folder / "int8.onnx")
    )
    for name, ir_mode in (("openvino f32", "none"), (f"openvino int8 ({mode})", mode)):
        try:
            path = folder / f"{ir_mode}.xml"
            onnx_to_ir(folder / ONNX_FILE, path, json.dumps(meta), ir_mode, calibration if ir_mode == "full" else None)
            rows.append((name, load_exported(path, "cpu", "openvino"), path))
        except ImportError as err:
            rows.append((name, f"not installed ({err.name}): pip install 'inpformer[openvino]'", None))
    return rows


def _size_mib(path: Path | None) -> float:
    if path is None:
        return float("nan")
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / MIB


def benchmark(p: Params, model_ref: str | None, runs: int) -> list[dict[str, Any]]:
    """Measure every runtime (see the module); print the table and write it; returns the rows."""
    model = open_model(p, model_ref, "cpu")
    if model.model is None:
        raise ValueError(
            f"{model_ref}: benchmark needs a PyTorch model (folder or registry URI) to build each runtime."
        )
    images, categories = evaluation_batch(p, model)
    ref_maps, ref_scores = model.scorer(images)
    table = []
    with tempfile.TemporaryDirectory(prefix="inpformer-bench-") as tmp:
        for name, scorer, path in _runtimes(p, model, Path(tmp), images):
            if isinstance(scorer, str):
                table.append({"runtime": name, "skipped": scorer})
                continue
            _peak_rss_reset()
            row = {"runtime": name, **timed(scorer, images, runs), "peak_rss_mib": _peak_rss_mib()}
            _, scores = scorer(images)
            decide = model.rule.image
            same = [decide(c, float(a))[2] == decide(c, float(b))[2] for c, a, b in zip(categories, scores, ref_scores)]
            row |= {
                "file_mib": _size_mib(path),
                "agreement": float(np.mean(same)),
                "max_score_diff": float(np.max(np.abs(scores - ref_scores))),
            }
            table.append(row)
    summary = {
        "model": model.label,
        "version": model.version,
        "params_m": sum(t.numel() for t in model.model.parameters()) / 1e6,
    }
    summary |= {"gflops_per_image": gflops(model), "threads": torch.get_num_threads(), "rows": table}
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_text(BENCH_DIR / "benchmark.json", json.dumps(summary, indent=2))
    text = _markdown(summary)
    atomic_write_text(BENCH_DIR / "benchmark.md", text + "\n")
    print(text)
    run_id = log_benchmark(p, summary, model_ref)
    if run_id:
        print(f"logged to MLflow: run {run_id} of {p.tracking.experiment}{BENCHMARK_SUFFIX}")
    return table


def log_benchmark(p: Params, summary: dict[str, Any], model_ref: str | None) -> str:
    """One MLflow run of ``<experiment>-benchmark`` for ``summary``; its id ('' untracked). A
    registered version (``models:/…``) is tagged with the run and its eager batch-1 p50."""
    from pipelines.tracking.runs import safe_metric_name, tracked_run

    tracking = p.tracking.model_copy(update={"experiment": p.tracking.experiment + BENCHMARK_SUFFIX})
    q = p.model_copy(update={"tracking": tracking})
    tags = {"model": summary["model"], "model_version": summary["version"], "threads": str(summary["threads"])}
    with tracked_run(q, "benchmark", f"benchmark {summary['version']}", tags=tags) as mlflow:
        metrics = {"params_m": summary["params_m"], "gflops_per_image": summary["gflops_per_image"]}
        for row in summary["rows"]:
            for key in LOGGED:
                value = row.get(key)
                if isinstance(value, float) and value == value:
                    metrics[safe_metric_name(f"{row['runtime']}.{key}")] = value
        mlflow.log_metrics(metrics)
        for name in ("benchmark.json", "benchmark.md"):
            mlflow.log_artifact(str(BENCH_DIR / name))
        run = mlflow.active_run()
        run_id = run.info.run_id if run is not None else ""
    if run_id and model_ref and model_ref.startswith("models:/"):
        _tag_version(p, model_ref, run_id, summary["rows"])
    return run_id


def _tag_version(p: Params, model_ref: str, run_id: str, rows: list[dict[str, Any]]) -> None:
    from pipelines.loop.thresholds import registry_client, registry_version
    from pipelines.tracking.guard import tracking_failed

    try:
        client = registry_client(p)
        name, version = registry_version(client, model_ref)
        client.set_model_version_tag(name, version, "inpformer.benchmark_run", run_id)
        eager = next((r for r in rows if r["runtime"] == "eager fp32" and "p50_ms" in r), None)
        if eager is not None:
            client.set_model_version_tag(name, version, "inpformer.p50_ms", f"{eager['p50_ms']:.2f}")
    except Exception as err:  # the benchmark is written: tracking errors only warn
        tracking_failed(p, "tagging the registered version with the benchmark", err)


def _markdown(summary: dict[str, Any]) -> str:
    head = (
        "| runtime | p50 ms | p95 ms | p99 ms | img/s @8 | process RSS MiB | file MiB | same decisions | max Δscore |"
    )
    lines = [
        f"{summary['model']} ({summary['version']}): {summary['params_m']:.1f} M parameters, "
        f"{summary['gflops_per_image']:.2f} GFLOPs per image, {summary['threads']} threads",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['runtime']} | {r['skipped']} | | | | | | | |")
            continue
        cells = [r["p50_ms"], r["p95_ms"], r["p99_ms"], r["images_per_s"], r["peak_rss_mib"], r["file_mib"]]
        nums = " | ".join("-" if c != c else f"{c:.1f}" for c in cells)
        lines.append(f"| {r['runtime']} | {nums} | {r['agreement']:.1%} | {r['max_score_diff']:.1e} |")
    return "\n".join(lines)
