"""dvc.yaml declares exactly what each stage depends on: the modules its entry point imports
(transitively, within the project; no more, so editing another module never reruns it) and the
params keys it reads (leaf keys; a whole section only where the stage reads the section whole);
and dvc.lock matches the code.

``tracking.*``, ``registry.*`` and ``limits.*`` are never stage params: where runs are recorded, the
champion gate, and guards that only refuse or wait, change no output DVC versions. The ``check``
stage depends on params.yaml whole.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import copy_repository
from pydantic import BaseModel

from pipelines.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    "check": "pipelines/stages/check.py",
    "prepare": "pipelines/stages/prepare_data.py",
    "synthesize": "pipelines/stages/synthesis.py",
    "train": "pipelines/stages/training.py",
    "evaluate": "pipelines/stages/evaluation.py",
}
PACKAGES = ("components", "pipelines")


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    """Project modules imported by ``path`` (``from pkg import mod`` counts ``pkg/mod.py`` too)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES and (f := _module_file(name)) is not None:
                found.add(f)
    return found


def _with_parents(f: Path) -> set[Path]:
    """``f`` and the ``__init__.py`` of every package above it (Python runs them first)."""
    out = {f}
    for parent in f.parents:
        if parent == ROOT:
            break
        if (parent / "__init__.py").is_file():
            out.add(parent / "__init__.py")
    return out


def import_closure(entry: Path) -> set[Path]:
    """Every project module reached from ``entry``, skipping the stages package's re-export of the
    other stages (running one stage executes none of their code)."""
    todo, seen = [entry], {entry}
    while todo:
        for f in {g for imported in _imports(todo.pop()) for g in _with_parents(imported)}:
            if f.name == "__init__.py" and f.parent.name == "stages":
                continue  # the stages package re-exports every stage; a stage needs only its own module
            if f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


def _stages() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", list(ENTRY_POINTS))
def test_stage_deps_are_the_imported_modules(stage: str) -> None:
    deps = [d for d in _stages()[stage]["deps"] if isinstance(d, str)]
    closure = import_closure(ROOT / ENTRY_POINTS[stage])
    assert len(closure) > 5
    missing = sorted(p.relative_to(ROOT).as_posix() for p in closure if not _covered(p, deps))
    assert not missing, f"{stage}: add to its deps in dvc.yaml: {missing}"
    code = {d for d in deps if d.startswith(PACKAGES)}
    extra = sorted(code - {p.relative_to(ROOT).as_posix() for p in closure})
    assert not extra, f"{stage}: not imported by the stage, remove from its deps in dvc.yaml: {extra}"


class _Recorder:
    """Wraps a params model and records the dotted keys read through it."""

    def __init__(self, model: BaseModel, prefix: str, reads: set[str]) -> None:
        self._model, self._prefix, self._reads = model, prefix, reads

    def __getattr__(self, name: str) -> Any:
        if name == "model_dump":  # a section dumped whole is a section read whole
            if self._prefix:
                self._reads.add(self._prefix.rstrip("."))
            return self._model.model_dump
        value = getattr(self._model, name)
        key = f"{self._prefix}{name}"
        if isinstance(value, BaseModel):
            return _Recorder(value, key + ".", self._reads)
        self._reads.add(key)
        return value


def _declared(stage: str) -> list[str]:
    return [str(k) for k in _stages()[stage].get("params", [])]


def _is_declared(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


TINY = [
    "data.image_size=64",
    "data.crop_size=56",
    "data.synthetic.size=64",
    "data.synthetic.n_train=4",
    "data.synthetic.n_test_good=1",
    "data.synthetic.n_test_per_defect=1",
    "data.synthetic.categories=[brick]",
    "synthesis.bank_copies=1",
    "model.encoder_overrides={embed_dim: 32, num_heads: 2}",
    "model.seg_head_channels=8",
    "train.epochs=1",
    "train.batch_size=4",
    "eval.resize=64",
    "eval.grid_images=1",
    "tracking.enabled=false",
]


# Runs that between them take every branch of the stages that reads params (settings, calibration split).
VARIANTS = {
    "multi_class": [],
    "few_shot": ["setting.kind=few_shot", "setting.few_shot_k=2"],
    "semi_supervised": ["setting.kind=semi_supervised", "setting.semi_supervised_n=1"],
    "validation_thresholds": ["eval.threshold.split=validation"],
    "zero_shot": ["setting.kind=zero_shot", "setting.zero_shot_source=artifacts/models/all"],
}
UNTRACKED_SECTIONS = ("tracking", "limits", "registry")  # where runs go, the gate, guards: no output depends on them
WHOLE_PARAMS_USES = ("model_dump",)  # p.model_dump(): the DDP consistency check and the checkpoint folder name


def static_reads(module: Path) -> set[str]:
    """The params keys a stage's own module names (``p.data.extract``, ``p.seed``): branches the
    variant runs may not take. Maximal attribute chains on the name ``p``."""
    chains = set()
    for node in ast.walk(ast.parse(module.read_text())):
        parts, n = [], node
        while isinstance(n, ast.Attribute):
            parts.append(n.attr)
            n = n.value
        if parts and isinstance(n, ast.Name) and n.id == "p":
            chains.add(".".join(reversed(parts)))
    maximal = {c for c in chains if not any(o.startswith(c + ".") for o in chains)}
    return {c for c in maximal if c not in WHOLE_PARAMS_USES and c.split(".")[0] not in UNTRACKED_SECTIONS}


def _reads(stage_runs: dict[str, Any], overrides: list[str]) -> dict[str, set[str]]:
    p: Params = load_params("params.yaml", [*TINY, *overrides])
    out = {}
    for stage, run in stage_runs.items():
        reads: set[str] = set()
        run(_Recorder(p, "", reads))
        out[stage] = {k for k in reads if k.split(".")[0] not in UNTRACKED_SECTIONS}
    return out


@pytest.mark.slow
def test_stage_params_are_the_keys_read(tmp_path, monkeypatch) -> None:
    from pipelines import stages

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    runs = {
        "prepare": lambda q: stages.prepare(q),
        "synthesize": lambda q: stages.synthesize(q, progress=False),
        "train": lambda q: stages.train(q, progress=False),
        "evaluate": lambda q: stages.evaluate(q, progress=False),
    }
    reads: dict[str, set[str]] = {stage: set() for stage in runs}
    for overrides in VARIANTS.values():
        for stage, keys in _reads(runs, overrides).items():
            reads[stage] |= keys
    for stage, keys in reads.items():  # what the stage's module names, unless read above key by key
        named = static_reads(ROOT / ENTRY_POINTS[stage])
        keys |= {c for c in named if not any(k == c or k.startswith(c + ".") for k in keys)}
    problems = {}
    for stage, keys in reads.items():
        assert keys, stage
        declared = _declared(stage)
        missing = sorted(k for k in keys if not _is_declared(k, declared))
        unread = sorted(d for d in declared if not any(k == d or k.startswith(d + ".") for k in keys))
        coarse = sorted(d for d in declared if d not in keys and any(k.startswith(d + ".") for k in keys))
        if missing or unread or coarse:
            problems[stage] = {"add": missing, "remove (not read)": unread, "list the keys instead of": coarse}
    assert not problems, f"the stages' params in dvc.yaml: {problems}"


@pytest.mark.slow
def test_committed_lock_matches_the_code(tmp_path) -> None:
    """`dvc status` on a copy of the repository: the committed dvc.lock names the current code."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    copy_repository(tmp_path)
    dvc = Path(sys.executable).parent / "dvc"
    out = subprocess.run([str(dvc), "status", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    status = yaml.safe_load(out.stdout or "{}") or {}
    assert out.returncode == 0, out.stderr
    stale = {}
    for stage, changes in status.items():
        for change in changes if isinstance(changes, list) else []:
            for path, why in (change.get("changed deps") or {}).items() if isinstance(change, dict) else []:
                produced = path.startswith(("data/", "artifacts/"))  # outputs of earlier stages: absent here
                if isinstance(why, dict) or (why == "modified" and not produced):
                    stale.setdefault(stage, []).append(f"{path}: {why}")
    assert not stale, f"dvc.lock is stale (run `make demo` and commit dvc.lock): {stale}"
