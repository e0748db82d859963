"""The end of a sweep: whether its best trial beats the noise floor, and ``inpformer sweep --apply``."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Params, load_params
from pipelines.paths import SWEEP_DIR
from pipelines.repro.record import min_gain

__all__ = ["BEST_PARAMS_FILE", "apply_best", "apply_command", "beats_noise"]

BEST_PARAMS_FILE = SWEEP_DIR / "best_params.yaml"


def beats_noise(p: Params, values: list[float], best: float) -> bool | None:
    """Whether the best trial is more than the noise floor (``registry.min_gain``, from the scope's
    measured std when ``auto``) above the median complete trial; printed; None when unknown."""
    gain, source = min_gain(p)
    if p.sweep.metric != "mad" or gain <= 0 or len(values) < 2:
        print("Noise floor unknown for this sweep (inpformer noise measures it): no trial is known to beat the noise.")
        return None
    median = float(statistics.median(values))
    lead = (best - median) if p.sweep.direction == "maximize" else (median - best)
    beats = lead > gain
    verdict = "beats" if beats else "does NOT beat"
    print(f"The best trial {verdict} the noise: {lead:+.4f} over the median trial vs min_gain {gain:.4f} ({source}).")
    return beats


def apply_command(best: dict[str, Any], name: str, overrides: list[str] | None = None) -> list[str]:
    """``dvc exp run --temp -n NAME -S KEY=VALUE ...``: the best values (then ``overrides``, which win)
    on top of the committed params.yaml, in a temporary copy (the workspace is left as it is, so the
    next experiment does not stack on this one)."""
    sets = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in sorted(best.items())]
    return ["dvc", "exp", "run", "--temp", "-n", name] + [x for s in [*sets, *(overrides or [])] for x in ("-S", s)]


def apply_best(p: Params, params_path: str, name: str | None = None, overrides: list[str] | None = None) -> int:
    """Run the best params as a DVC experiment (train → evaluate → register through the champion gate)
    at params.yaml's own settings (``train.epochs`` …) plus ``overrides`` (``--set``). Refused while
    params.yaml differs from the last commit: the experiment would silently inherit those edits
    (e.g. an earlier experiment applied to the workspace)."""
    if not BEST_PARAMS_FILE.is_file():
        msg = f"{BEST_PARAMS_FILE} not found: run `inpformer sweep` first."
        raise FileNotFoundError(msg)
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", params_path], check=False).returncode == 1
    if changed:
        msg = (
            f"{params_path} differs from the last commit (`git diff {params_path}`): the best params would run on "
            f"top of those edits. Commit them, or restore the baseline (`git checkout {params_path}`), then apply."
        )
        raise ValueError(msg)
    best = yaml.safe_load(BEST_PARAMS_FILE.read_text()) or {}
    command = apply_command(best, name or f"{p.sweep.study}-best", overrides)
    load_params(params_path, [c for c in command[6:] if c != "-S"])  # validate before DVC starts
    dvc = Path(sys.executable).parent / "dvc"
    if dvc.exists():
        command[0] = str(dvc)
    print("$ " + " ".join(command))
    return subprocess.run(command, check=False).returncode
