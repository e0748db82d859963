"""The code's own rules, checked on the source: layering, module and signature sizes, imports."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "pipelines")
MAX_MODULE_LINES = 350
MAX_PARAMS = 8
MAX_TOP_LEVEL_MODULES = {"components": 12, "pipelines": 10}  # the rest lives in folders by concern
ORCHESTRATION = {"prefect", "mlflow", "dvc", "optuna", "pydantic"}
# Layers that keep the official INP-Former constructor arguments may take more (none needs to today).
OFFICIAL_NAME_LAYERS: set[str] = set()


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


def test_no_function_takes_more_than_8_parameters() -> None:
    too_many = []
    for path in _modules():
        tree = _tree(path)
        official = {
            id(f)
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef) and c.name in OFFICIAL_NAME_LAYERS
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name == "__init__"
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(node) not in official:
                a = node.args
                names = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
                n = len([x for x in names if x not in ("self", "cls")])
                if n > MAX_PARAMS:
                    too_many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert not too_many


@pytest.mark.parametrize("package", PACKAGES)
def test_top_level_modules_are_few(package: str) -> None:
    top = sorted(p.name for p in (ROOT / package).glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES[package], top


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level and inside functions, not ``if TYPE_CHECKING:``."""
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def _import_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports (``from pkg import mod`` names ``pkg.mod``)."""
    modules = {_module_name(p): p for p in _modules()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in _runtime_imports(_tree(path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            else:
                targets = []
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_no_import_cycle_including_function_level_imports() -> None:
    graph = _import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph is really built
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_the_model_takes_one_config() -> None:
    from components.model import InpFormer, InpFormerConfig

    params = list(inspect.signature(InpFormer.__init__).parameters.values())[1:]
    assert [p.annotation for p in params] in (["InpFormerConfig | None"], [InpFormerConfig | None])


def _defaults(cls) -> dict:
    from pydantic import BaseModel

    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return cls().model_dump()
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_params_defaults_equal_the_constructors_defaults() -> None:
    """One default per setting: the params sections and the configs the builders fill by field name."""
    from components.engine.train_config import TrainConfig
    from components.model import InpFormerConfig
    from pipelines.builders import MODEL_RENAMES
    from pipelines.config.params import ModelParams, TrainParams

    model = {MODEL_RENAMES.get(k, k): v for k, v in _defaults(ModelParams).items()}
    arch = _defaults(InpFormerConfig)
    shared = sorted(set(model) & set(arch))
    assert len(shared) >= 18
    assert {k: _plain(model[k]) for k in shared} == {k: _plain(arch[k]) for k in shared}
    train, engine = _defaults(TrainParams), _defaults(TrainConfig)
    shared = sorted((set(train) & set(engine)) - {"device"})  # device: the builder resolves "auto"
    assert len(shared) >= 15
    assert {k: _plain(train[k]) for k in shared} == {k: _plain(engine[k]) for k in shared}


def test_no_nested_conditional_expression() -> None:
    nested = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _modules()
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.IfExp) and any(isinstance(x, ast.IfExp) for x in (node.body, node.orelse, node.test))
    ]
    assert not nested


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
