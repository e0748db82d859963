"""``inpformer benchmark``: deployment figures of one model per runtime, measured side by side in one run.

Rows: eager PyTorch fp32, eager bf16 autocast (only where the CPU has native bf16: AVX512-BF16 or
AMX; else the row says so), TorchScript, ONNX Runtime, OpenVINO f32 and OpenVINO INT8 (weights; the
export's ``export.int8_mode``), each built into a temporary folder from the same model. Columns:
batch-1 latency p50 / p95 / p99 over ``--runs`` calls after ``WARMUP`` calls, throughput at batch
``THROUGHPUT_BATCH`` (images/s), the process's peak RSS after that runtime ran (Linux VmHWM, reset
before each row; it includes what earlier rows still hold, so it bounds rather than isolates a
runtime's memory), the artifact's file size, and agreement with eager on ``export.parity_images`` evaluation images
(decisions at each category's threshold, max |score difference|). Parameters and GFLOPs per image
(``torch.utils.flop_counter``) are the model's, printed once. Written to
``artifacts/benchmark/benchmark.{json,md}``.
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
from components.scoring.openvino_ir import onnx_to_ir
from components.scoring.scorer import LoadedModel
from pipelines import cpu_flags
from pipelines.config import Params
from pipelines.paths import ARTIFACTS
from pipelines.serve.export import evaluation_batch
from pipelines.serve.predict import open_model

__all__ = ["BENCH_DIR", "benchmark", "gflops"]

BENCH_DIR = ARTIFACTS / "benchmark"
WARMUP, THROUGHPUT_BATCH, THROUGHPUT_RUNS = 3, 8, 3
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIB = 2**20
ONNX_FILE = "scorer" + FORMATS["onnx"]


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


def _timed(run: Callable[[torch.Tensor], Any], images: torch.Tensor, runs: int) -> dict[str, float]:
    one = images[:1]
    for _ in range(WARMUP):
        run(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(one)
        times.append((time.perf_counter() - start) * 1000.0)
    batch = images[:THROUGHPUT_BATCH].repeat((THROUGHPUT_BATCH + len(images) - 1) // len(images), 1, 1, 1)[
        :THROUGHPUT_BATCH
    ]
    rates = []
    for _ in range(THROUGHPUT_RUNS):
        start = time.perf_counter()
        run(batch)
        rates.append(THROUGHPUT_BATCH / (time.perf_counter() - start))
    q = np.percentile(times, [50, 95, 99])
    return {
        "p50_ms": float(q[0]),
        "p95_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "images_per_s": statistics.median(rates),
    }


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
    for name, mode in (("openvino f32", "none"), (f"openvino int8 ({p.export.int8_mode})", p.export.int8_mode)):
        try:
            path = folder / f"{mode}.xml"
            calibration = [images[i : i + 1].numpy() for i in range(len(images))] if mode == "full" else None
            onnx_to_ir(folder / ONNX_FILE, path, json.dumps(meta), mode, calibration)
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
            row = {"runtime": name, **_timed(scorer, images, runs), "peak_rss_mib": _peak_rss_mib()}
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
    return table


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
