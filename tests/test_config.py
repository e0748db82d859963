"""params: one source of defaults (the paper), strict validation, error messages that name real keys."""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from components.engine.training import TrainConfig
from pipelines.builders import build_train_config
from pipelines.config import ConfigError, Params, flatten, load_params

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = tuple(Params.model_fields)
FILE_SUFFIXES = {"safetensors", "json", "yaml", "csv", "md", "png", "db", "lock", "txt", "npy", "pth", "py", "log"}


def test_paper_params_equal_the_defaults() -> None:
    paper = load_params(ROOT / "params.paper.yaml")
    assert paper == Params()
    assert (paper.model.encoder, paper.data.image_size, paper.data.crop_size, paper.train.epochs) == (
        "dinov2reg_vit_base_14",
        448,
        392,
        200,
    )
    assert (paper.model.num_prototypes, paper.loss.gamma, paper.loss.lam) == (6, 3.0, 0.2)


def test_paper_file_lists_every_key() -> None:
    paper = flatten(yaml.safe_load((ROOT / "params.paper.yaml").read_text()))
    assert set(paper) == set(flatten(Params()))


def test_demo_params_are_complete_and_valid() -> None:
    demo = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert set(demo) == set(flatten(Params()))  # DVC tracks params.yaml: every key is written out
    p = load_params(ROOT / "params.yaml")
    assert p.model.encoder == "dinov2reg_vit_small_14" and p.data.dataset == "synthetic"


def test_train_config_defaults_match_train_params() -> None:
    defaults = Params().train.model_dump()
    shared = [f for f in fields(TrainConfig) if f.name in defaults and f.name != "device"]
    assert len(shared) >= 15
    for f in shared:
        want = defaults[f.name]
        assert f.default == (tuple(want) if isinstance(f.default, tuple) else want), f.name


def test_train_config_is_built_from_every_shared_key() -> None:
    p = load_params(ROOT / "params.yaml", ["train.head_lr_scale=0.3", "train.epochs=3", "loss.seg_weight=0.7"])
    cfg = build_train_config(p, progress=False)
    assert (cfg.head_lr_scale, cfg.epochs, cfg.seg_weight, cfg.seed) == (0.3, 3, 0.7, p.seed)
    off = build_train_config(load_params(ROOT / "params.yaml", ["model.seg_head=none"]), progress=False)
    assert off.residual_mode == "off"  # no head → no residual learning, decided in the builder


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.num_protoypes=8", "model.num_protoypes: unknown key"),
        ("model.num_prototypes=0", "model.num_prototypes"),
        ("train.epochs=many", "train.epochs"),
        ("loss.coherence=medium", "loss.coherence"),
        ("data.crop_size=100", "multiple of the patch size 14"),
        ("eval.map=heat", "eval.map"),
    ],
)
def test_bad_params_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert needle in str(err.value)


def test_unknown_key_lists_allowed(tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert "train.epoch: unknown key" in str(err.value) and "epochs" in str(err.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_params_file_is_an_error(tmp_path, text: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="is empty"):
        load_params(tmp_path / "params.yaml")


def test_missing_params_file_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def _is_key(dotted: str) -> bool:
    node: type[BaseModel] | None = Params
    for part in dotted.split("."):
        if node is None:
            return True  # below a free-form mapping (e.g. sweep.space, model.encoder_overrides)
        field = node.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return True


def _strings(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def test_every_params_key_named_in_a_message_exists() -> None:
    pattern = re.compile(rf"(?<![\w./])(?:{'|'.join(SECTIONS)})(?:\.[a-z][a-z0-9_]*)+")
    found, missing = 0, []
    for pkg in ("components", "pipelines"):
        for path in (ROOT / pkg).rglob("*.py"):
            for line, text in _strings(path):
                for m in pattern.finditer(text):
                    key = m.group(0).rstrip(".")
                    if key.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                        continue
                    found += 1
                    if not _is_key(key):
                        missing.append(f"{path.relative_to(ROOT)}:{line}: {key}")
    assert found > 20  # the scan sees the messages
    assert not missing


def test_components_messages_do_not_name_params_keys() -> None:
    """components/ speaks of constructor arguments; only pipelines/ knows params.yaml."""
    pattern = re.compile(rf"(?<![\w./])(?:{'|'.join(s for s in SECTIONS if s not in ('model', 'data'))})\.[a-z_]+")
    hits = []
    for path in (ROOT / "components").rglob("*.py"):
        for line, text in _strings(path):
            hits += [f"{path.name}:{line}: {m.group(0)}" for m in pattern.finditer(text)]
            hits += [f"{path.name}:{line}: {k}" for k in re.findall(r"(?:model|data)\.[a-z_]+_[a-z_]+", text)]
    assert not hits


def test_cli_rejects_bad_params_before_any_work(tmp_path) -> None:
    import subprocess
    import sys

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--set", "model.num_prototypes=0"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.num_prototypes" in proc.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "..", "", "x..y", ".hidden"])
def test_names_that_become_paths_are_rejected(tmp_path, name: str) -> None:
    for key in ("data.name", "sweep.study", "data.extra_sources"):
        value = f"[{name!r}]" if key == "data.extra_sources" else repr(name)
        with pytest.raises(ConfigError, match="not a safe name"):
            load_params(ROOT / "params.yaml", [f"{key}={value}"])


def test_cli_prepare_rejects_an_unsafe_name_before_writing(tmp_path, monkeypatch, capsys) -> None:
    from pipelines.cli import main

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("mine")
    work = tmp_path / "ws"
    work.mkdir()
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    monkeypatch.chdir(work)
    for args in (["prepare", "--name", "../../outside"], ["synthesize", "--set", "data.name=../../outside"]):
        code = main(args)
        err = capsys.readouterr().err
        assert code != 0 and "not a safe name" in err, err
    assert (tmp_path / "outside" / "keep.txt").read_text() == "mine"
    assert not (work / "data").exists()
