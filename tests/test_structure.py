"""The code's own rules, checked on the source: layering, module and signature sizes, imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "pipelines")
MAX_MODULE_LINES = 350
MAX_PARAMS = 8
ORCHESTRATION = {"prefect", "mlflow", "dvc", "optuna", "pydantic"}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


def _is_module_subclass(cls: ast.ClassDef) -> bool:
    return any(ast.unparse(b) in ("nn.Module", "torch.nn.Module") for b in cls.bases)


def test_no_function_takes_more_than_8_parameters() -> None:
    too_many = []
    for path in _modules():
        tree = _tree(path)
        module_inits = {
            id(f)
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef) and _is_module_subclass(c)
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name == "__init__"
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(node) not in module_inits:
                a = node.args
                names = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
                n = len([x for x in names if x not in ("self", "cls")])
                if n > MAX_PARAMS:
                    too_many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert not too_many


def _is_table(stmt: ast.stmt) -> bool:
    """A module-level constant that is a literal tuple/list/dict (kept aligned by hand)."""
    value = getattr(stmt, "value", None)
    return isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(value, (ast.Tuple, ast.List, ast.Dict))


def test_fmt_skip_only_on_tables() -> None:
    offenders = []
    for path in _modules():
        lines = path.read_text().splitlines()
        tree = _tree(path)
        for i, line in enumerate(lines, start=1):
            if "# fmt: skip" in line:
                owners = [s for s in tree.body if s.lineno <= i <= (s.end_lineno or s.lineno)]
                if not (owners and _is_table(owners[0])):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert not offenders


def test_no_import_of_another_modules_private_name() -> None:
    offenders = []
    for path in _modules():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                offenders += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders


def test_components_never_import_orchestration_or_pipelines() -> None:
    offenders = []
    for path in (ROOT / "components").rglob("*.py"):
        for node in ast.walk(_tree(path)):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            offenders += [f"{path.name}: {m}" for m in mods if m.split(".")[0] in ORCHESTRATION | {"pipelines"}]
    assert not offenders
