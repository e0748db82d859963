"""Sweep speed: time per trial with and without the encoder-feature cache, and trials per hour with
1 and 2 workers, measured side by side in one run on the embedded synthetic dataset.

    python bench/sweep_speed.py [--epochs 2] [--trials 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _study_durations(p) -> list[float]:
    import optuna

    study = optuna.load_study(study_name=p.sweep.study, storage=p.sweep.storage)
    return [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials if t.datetime_complete]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--trials", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from pipelines import stages
    from pipelines.config import load_params
    from pipelines.sweep.study import run_sweep

    work = Path(tempfile.mkdtemp(prefix="inpformer-sweep-bench-"))
    cwd = os.getcwd()
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    os.chdir(work)
    try:
        base = [f"train.epochs={args.epochs}", "tracking.enabled=false", "sweep.pruner=none"]
        p = load_params("params.yaml", base)
        stages.prepare(p)
        stages.synthesize(p, progress=False)
        rows = []
        for label, extra, workers, n in (
            ("no cache, 1 worker", ["train.feature_cache=false", "sweep.study=nocache"], 1, 2),
            ("cache, 1 worker", ["train.feature_cache=true", "sweep.study=cache"], 1, 1 + args.trials // 2),
            ("cache, 2 workers", ["train.feature_cache=true", "sweep.study=cache2"], 2, args.trials),
            ("cache, 1 worker (rate)", ["train.feature_cache=true", "sweep.study=cache1"], 1, args.trials),
        ):
            over = [*base, *extra]
            q = load_params("params.yaml", over)
            t = time.perf_counter()
            run_sweep(q, "params.yaml", over, n_trials=n, workers=workers)
            wall = time.perf_counter() - t
            d = _study_durations(q)
            rows.append((label, n, workers, wall, d))
        print(f"\nepochs per trial: {args.epochs}; cores: {os.cpu_count()}")
        print(
            f"{'run':<24} {'trials':>6} {'wall s':>8} {'s/trial (mean)':>15} "
            f"{'s/trial (after 1st)':>20} {'trials/hour':>12}"
        )
        print("-" * 90)
        for label, n, _w, wall, d in rows:
            later = sum(d[1:]) / max(len(d) - 1, 1) if len(d) > 1 else float("nan")
            print(f"{label:<24} {n:>6} {wall:>8.1f} {sum(d) / len(d):>15.1f} {later:>20.1f} {3600 * n / wall:>12.1f}")
        nocache = sum(rows[0][4]) / len(rows[0][4])
        cache_later = sum(rows[1][4][1:]) / max(len(rows[1][4]) - 1, 1)
        print(f"\ntime per trial, cache / no cache (cache already built): {cache_later / nocache:.2f}x (target ≤ 0.4x)")
        print(f"trials per hour, 2 workers / 1 worker: {(rows[2][1] / rows[2][3]) / (rows[3][1] / rows[3][3]):.2f}x")
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
