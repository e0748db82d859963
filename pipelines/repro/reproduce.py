"""``inpformer reproduce REF``: rebuild a registered version from its record alone and compare.

The record is the evaluate run the version was registered under: its ``git_commit`` tag, its
resolved params (``params/resolved.json``), its ``data_hash`` tag and its metrics. The rebuild runs
in a scratch git worktree at that commit, with those params and the workspace's DVC cache: ``dvc
checkout`` restores what the commit's ``dvc.lock`` names from the cache, the data stages bring the
data up to date (rebuilding what the cache lacks), and training and evaluation always run again
(``--force --no-run-cache``; their MLflow store lives in the scratch tree). The workspace is untouched.

Exit 0 when every compared metric is within its tolerance and the data hash matches; 1 otherwise,
with a table. Tolerance per metric: ``registry.noise_multiple`` × its std in the scope's noise
record when measured (``inpformer noise``), else ``registry.reproduce_tolerance``. Bit-identical
results are expected only on the same CPU kernels and thread count (see the README).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from components.evaluation.metrics import METRIC_KEYS
from pipelines.config import Params
from pipelines.errors import CommandFailed
from pipelines.repro.record import noise_record
from pipelines.tracking.guard import TRACKING_ROOT_ENV
from pipelines.tracking.runs import hermetic_env

__all__ = ["compare", "reproduce", "resolve_run"]

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
STEP_TIMEOUT_S = 6 * 3600  # one dvc command of the rebuild


def resolve_run(p: Params, ref: str) -> str:
    """The run id behind ``ref``: ``models:/name@alias``, ``models:/name/version``, ``runs:/id/...`` or an id."""
    from mlflow import MlflowClient

    from pipelines.tracking.runs import open_tracking

    open_tracking(p)
    client = MlflowClient()
    if ref.startswith("models:/"):
        body = ref[len("models:/") :]
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        name, _, version = body.partition("/")
        return client.get_model_version(name, version).run_id
    if ref.startswith("runs:/"):
        return ref[len("runs:/") :].split("/", 1)[0]
    if RUN_ID.match(ref):
        return ref
    raise ValueError(f"{ref!r}: expected models:/<name>@<alias>, models:/<name>/<version>, runs:/<id> or a run id.")


def _record(p: Params, run_id: str) -> dict[str, Any]:
    """What the run recorded: commit, dirty flag, params, data hash, metrics."""
    import mlflow
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    tags = run.data.tags
    try:
        params = mlflow.artifacts.load_dict(f"runs:/{run_id}/params/resolved.json")
    except Exception as err:
        raise CommandFailed(f"run {run_id} has no params/resolved.json ({err}): it cannot be rebuilt.") from err
    commit = tags.get("git_commit", "")
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise CommandFailed(f"run {run_id} records no git commit ({commit or 'none'}): it cannot be rebuilt.")
    return {
        "run_id": run_id,
        "commit": commit,
        "dirty": tags.get("git_dirty") == "true",
        "params": params,
        "data_hash": tags.get("data_hash", ""),
        "metrics": dict(run.data.metrics),
    }


def _run(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False)
    if out.returncode != 0:
        tail = (out.stdout + out.stderr).strip().splitlines()[-15:]
        raise CommandFailed(f"{what} failed ({' '.join(cmd)}):\n  " + "\n  ".join(tail))
    return out.stdout


def _run_streamed(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    """Run a long step with its output (stdout and stderr) passed on line by line, indented, so the
    stages' progress lines show while it runs; the last lines name the failure."""
    tail: list[str] = []
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"  | {line.rstrip()}", flush=True)
            tail = [*tail[-14:], line.rstrip()]
        code = proc.wait(timeout=STEP_TIMEOUT_S)
    if code != 0:
        raise CommandFailed(f"{what} failed ({' '.join(cmd)}):\n  " + "\n  ".join(tail))


def _rebuild(record: dict[str, Any], scratch: Path, workspace: Path) -> dict[str, Any]:
    """Worktree at the commit, the recorded params, the data from the DVC cache, train + evaluate forced."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "INPFORMER_TRACKING"))}
    env[TRACKING_ROOT_ENV] = str(scratch)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    known = subprocess.run(["git", "cat-file", "-e", f"{record['commit']}^{{commit}}"], cwd=workspace, check=False)
    if known.returncode != 0:
        raise CommandFailed(f"commit {record['commit']} is not in this repository: fetch it, then reproduce again.")
    _run(["git", "worktree", "add", "--detach", str(scratch), record["commit"]], workspace, env, "git worktree")
    (scratch / "params.yaml").write_text(yaml.safe_dump(record["params"], sort_keys=False))
    cache = workspace / ".dvc" / "cache"
    dvc = [str(Path(bin_dir) / "dvc")]
    _run([*dvc, "config", "--local", "cache.dir", str(cache)], scratch, env, "dvc config")
    restored = subprocess.run([*dvc, "checkout"], cwd=scratch, env=env, capture_output=True, text=True, check=False)
    if restored.returncode != 0:  # e.g. the commit's dvc.lock predates the run: the data stages rebuild it
        print("some outputs of the commit's dvc.lock are not in the DVC cache: the data stages rebuild them")
    print(f"rebuilding commit {record['commit'][:12]} in {scratch}")
    try:
        _run_streamed([*dvc, "repro", "synthesize"], scratch, env, "preparing the data (dvc repro synthesize)")
    except CommandFailed as err:
        raise CommandFailed(f"the recorded data is not available (dvc pull it into {cache}?): {err}") from err
    force = [*dvc, "repro", "--force", "--no-run-cache", "--downstream", "train"]  # always trained again
    _run_streamed(force, scratch, env, "training and evaluating again")
    metrics = json.loads((scratch / "metrics" / "metrics.json").read_text())
    eval_run = json.loads((scratch / "artifacts" / "eval_run.json").read_text())
    return {"metrics": metrics, "run_id": eval_run.get("run_id", "")}


def _rebuilt_data_hash(scratch: Path, params: dict[str, Any]) -> str:
    from pipelines.config import load_params
    from pipelines.stages.records import data_hash

    cwd = Path.cwd()
    try:
        os.chdir(scratch)
        return data_hash(load_params("params.yaml", []))
    finally:
        os.chdir(cwd)


def compare(recorded: dict[str, float], rebuilt: dict[str, Any], tolerance: dict[str, float]) -> list[dict[str, Any]]:
    """Rows metric | recorded | reproduced | diff | tolerance | ok for the mean metrics and each
    category's mAD (undefined on both sides counts as equal)."""
    rows = []
    pairs = [(k, recorded.get(k, math.nan), rebuilt["mean"].get(k), tolerance[k]) for k in METRIC_KEYS]
    for cat, values in rebuilt.get("categories", {}).items():
        pairs.append((f"{cat}/mad", recorded.get(f"{cat}/mad", math.nan), values.get("mad"), tolerance["mad"]))
    for key, want, got, tol in pairs:
        got = math.nan if got is None else float(got)
        both_nan = math.isnan(want) and math.isnan(got)
        diff = 0.0 if both_nan else abs(got - want)
        rows.append(
            {
                "metric": key,
                "recorded": want,
                "reproduced": got,
                "diff": diff,
                "tolerance": tol,
                "ok": both_nan or diff <= tol,
            }
        )
    return rows


def _tolerances(p: Params) -> tuple[dict[str, float], str]:
    record = noise_record(p)
    std = (record or {}).get("std", {})
    out, source = {}, f"registry.reproduce_tolerance={p.registry.reproduce_tolerance:g}"
    for k in METRIC_KEYS:
        s = std.get(k)
        out[k] = (
            p.registry.noise_multiple * float(s)
            if isinstance(s, (int, float)) and s == s
            else p.registry.reproduce_tolerance
        )
    if record:
        source = f"{p.registry.noise_multiple:g} × the std over {record.get('k')} seeds (metrics/noise.json)"
    return out, source


def reproduce(p: Params, ref: str, keep: bool = False) -> int:
    """Rebuild ``ref`` and compare; the exit code (0 within tolerance and same data, else 1)."""
    hermetic_env(os.getcwd())
    workspace = Path.cwd().resolve()
    record = _record(p, resolve_run(p, ref))
    if record["dirty"]:
        print(f"warning: run {record['run_id']} was recorded from uncommitted code: the rebuild uses the commit's.")
    scratch = Path(tempfile.mkdtemp(prefix="inpformer-reproduce-")) / "tree"
    try:
        rebuilt = _rebuild(record, scratch, workspace)
        data = _rebuilt_data_hash(scratch, record["params"])
    finally:
        if not keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(scratch)], cwd=workspace, check=False)
            subprocess.run(["git", "worktree", "prune"], cwd=workspace, check=False)
            shutil.rmtree(scratch.parent, ignore_errors=True)
    tolerance, source = _tolerances(p)
    rows = compare(record["metrics"], rebuilt["metrics"], tolerance)
    print(f"\nreproduce {ref} (run {record['run_id']}, commit {record['commit'][:12]}); tolerance: {source}")
    print(f"{'metric':<22}{'recorded':>10}{'reproduced':>12}{'diff':>10}{'tolerance':>11}  ok")
    for r in rows:
        numbers = f"{r['recorded']:>10.4f}{r['reproduced']:>12.4f}{r['diff']:>10.4f}{r['tolerance']:>11.4f}"
        print(f"{r['metric']:<22}{numbers}  {'yes' if r['ok'] else 'NO'}")
    same_data = not record["data_hash"] or data == record["data_hash"]
    if not same_data:
        print(f"data differs: the record's data_hash is {record['data_hash']}, the rebuild's is {data}")
    elif not record["data_hash"]:
        print("the record has no data_hash (recorded before it existed): the data was not compared")
    ok = same_data and all(r["ok"] for r in rows)
    identical = ok and all(r["diff"] == 0 for r in rows)
    verdict = "NOT reproduced"
    if ok:
        verdict = "bit-identical" if identical else "reproduced within tolerance"
    print(f"{verdict}{'' if not keep else f' (scratch tree kept: {scratch})'}")
    return 0 if ok else 1
