"""The MLflow model registry: log the pyfunc model, register a version, move the aliases.

Aliases (documented in the README):

* ``candidate`` — every new version.
* ``champion-<dataset>-<setting>[-<group>]`` — the best version of that scope (:func:`champion_alias`):
  a finite mAD that beats the scope's current champion (:func:`should_promote`). Models of
  different datasets or settings are never compared with each other.
* ``champion`` — the champion of the default scope: the scope of the first version that became
  champion. It moves by the same rule, so another dataset's model never takes it (use the scoped
  alias for that dataset) and a NaN or missing metric never does.

The registered model holds no absolute host path: MLflow's ``model_code_path`` and the artifact's
source path are rewritten to paths relative to the model folder (MLflow loads code models by file
name), and its requirements are pinned to the versions in use. Loading a registered model runs its
code (``pyfunc_model.py`` and the copied packages): trust a registry as you trust code.

mlflow is imported inside the functions (heavy; tracking may be off).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from components.engine.checkpoint import repackage
from components.scoring.package import ModelPackage
from pipelines.repro.record import min_gain
from pipelines.tracking.runs import active_run_id, git_commit

if TYPE_CHECKING:
    from pipelines.config import Params

__all__ = [
    "CHAMPION",
    "MODEL_REQUIREMENTS",
    "PROMOTION_ENV",
    "champion_alias",
    "library_versions",
    "log_and_register_model",
    "pinned_requirements",
    "promotion",
    "should_promote",
]

SCOPE_DEFAULTS = {"group": "all", "metric_set": "image+pixel"}  # versions registered before the tag existed
CHAMPION = "champion"
CANDIDATE = "candidate"
MODEL_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pillow", "pyyaml", "pandas")  # what the pyfunc imports
PYFUNC_CODE = Path(__file__).parents[1] / "serve" / "pyfunc_model.py"  # models from code: no pickle
CODE_PACKAGES = ("components", "pipelines")
EXAMPLE_SIDE = 32  # pixels of the input example's image
PROMOTION_ENV = "INPFORMER_PROMOTION"  # "gate": evaluate registers a candidate only (set by inpformer retrain)
ALIAS_UNSAFE = re.compile(r"[^\w-]")  # MLflow aliases allow letters, digits, '_' and '-'


def champion_alias(scope: dict[str, str]) -> str:
    """``champion-<dataset>-<setting>``, plus ``-<group>`` unless the group is ``all``."""
    parts = [CHAMPION, scope["dataset"], scope["setting"]]
    if scope.get("group", "all") != "all":
        parts.append(scope["group"])
    return ALIAS_UNSAFE.sub("_", "-".join(parts))


def should_promote(
    champion_tags: dict[str, str] | None, scope: dict[str, str], mad: float, min_gain: float = 0.0
) -> bool:
    """Whether a new version with ``mad`` in ``scope`` replaces the champion (see :func:`promotion`)."""
    return promotion(champion_tags, scope, mad, min_gain)[0]


def promotion(
    champion_tags: dict[str, str] | None, scope: dict[str, str], mad: float, min_gain: float = 0.0
) -> tuple[bool, str]:
    """Whether a new version with ``mad`` in ``scope`` (dataset, setting, group, metric set) replaces
    the champion whose version tags are ``champion_tags``, and why.

    Never with a NaN or infinite mAD; always when there is no champion; otherwise only when the
    champion is of the same scope and ``mad`` beats its mAD by more than ``min_gain`` (the noise
    floor: a gain inside it is not evidence), or the champion's mAD is not finite.
    """
    if not math.isfinite(mad):
        return False, f"mAD {mad} is not finite"
    if champion_tags is None:
        return True, "no champion yet"
    if any(champion_tags.get(k, SCOPE_DEFAULTS.get(k, "")) != v for k, v in scope.items()):
        return False, "the champion is of another scope (dataset, setting, group or metric set)"
    try:
        current = float(champion_tags.get("mad", "nan"))
    except ValueError:
        return True, "the champion records no mAD"
    if not math.isfinite(current):
        return True, "the champion's mAD is not finite"
    gain = mad - current
    if gain > min_gain:
        return True, f"mAD {mad:.4f} beats the champion's {current:.4f} by {gain:+.4f} > min_gain {min_gain:.4f}"
    return False, f"mAD {mad:.4f} vs the champion's {current:.4f}: {gain:+.4f} is not more than min_gain {min_gain:.4f}"


def library_versions() -> dict[str, str]:
    """``{package: version}`` of :data:`MODEL_REQUIREMENTS` as installed (local suffixes like ``+cpu`` dropped)."""
    found = {}
    for pkg in MODEL_REQUIREMENTS:
        try:
            found[pkg] = version(pkg).split("+")[0]
        except PackageNotFoundError:
            continue
    return found


def pinned_requirements() -> list[str]:
    """``pkg==version`` for :data:`MODEL_REQUIREMENTS` as installed (unpinned where not installed)."""
    found = library_versions()
    return [f"{pkg}=={found[pkg]}" if pkg in found else pkg for pkg in MODEL_REQUIREMENTS]


def _tags_by_alias(client: Any, name: str, alias: str) -> dict[str, str] | None:
    try:
        return dict(client.get_model_version_by_alias(name, alias).tags or {})
    except Exception:  # MLflow raises a generic exception when the alias does not exist
        return None


def _relative_paths(mlmodel: Path) -> None:
    """Rewrite the absolute paths MLflow writes into ``MLmodel`` relative to the model folder."""
    spec = yaml.safe_load(mlmodel.read_text())
    flavor = spec["flavors"]["python_function"]
    if "model_code_path" in flavor:
        flavor["model_code_path"] = Path(flavor["model_code_path"]).name
    for artifact in (flavor.get("artifacts") or {}).values():
        artifact["uri"] = artifact["path"]
    mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))


def _save_pyfunc(mlflow: Any, model_dir: Path, package: ModelPackage, out: Path, map_size: int) -> None:
    """The pyfunc model folder ``out``: weights + calibrated ``package`` + code, no absolute paths.

    Raises:
        CheckpointError: ``package`` was computed on other weights than ``model_dir`` holds.
    """
    staged = out.parent / "staged" / model_dir.name
    shutil.copytree(model_dir, staged)
    repackage(staged, package)  # verifies that the package describes these bytes
    root = Path(__file__).resolve().parents[2]
    from pipelines.serve.pyfunc import model_signature  # imports mlflow.pyfunc: only when logging

    categories = list(package.thresholds)
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(PYFUNC_CODE),
        artifacts={"model": str(staged)},
        pip_requirements=pinned_requirements(),
        code_paths=[str(root / d) for d in CODE_PACKAGES],
        signature=model_signature(categories, map_size),
        input_example=_input_example(categories),
    )
    _relative_paths(out / "MLmodel")


def _input_example(categories: list[str]) -> Any:
    """One row: a small grey PNG (base64) and the first category."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (EXAMPLE_SIDE, EXAMPLE_SIDE), (128, 128, 128)).save(buffer, format="PNG")
    row = {
        "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "category": categories[0] if categories else "",
    }
    return pd.DataFrame([row])


def log_and_register_model(
    mlflow: Any,
    p: Params,
    model_dir: Path,
    package: ModelPackage,
    mad: float,
    group: str,
    promote: bool = True,
    metric_set: str = "image+pixel",
) -> dict[str, Any]:
    """Log the pyfunc model under the active run, register a version (alias ``candidate``) and move
    the scope's champion alias and ``champion`` when :func:`should_promote` says so (never when
    ``promote`` is false: e.g. categories without test images). mADs compare only within one
    ``metric_set`` (``image+pixel``, or ``image`` for data labelled per image).

    ``model_dir`` must hold the bytes ``package`` describes (checked: :func:`repackage`). The
    registered package records the git commit and the library versions in its provenance.
    """
    if not p.tracking.enabled or not p.tracking.log_model:
        return {}
    from mlflow import MlflowClient  # heavy; see the module docstring

    provenance = replace(package.provenance, git_commit=git_commit(), libraries=library_versions())
    package = replace(package, provenance=provenance)
    with tempfile.TemporaryDirectory(prefix="inpformer-model-") as tmp:
        _save_pyfunc(mlflow, model_dir, package, Path(tmp) / "model", p.serve.map_size)
        mlflow.log_artifacts(str(Path(tmp) / "model"), artifact_path=f"model-{group}")
    uri = f"runs:/{active_run_id(mlflow)}/model-{group}"
    name = p.tracking.registered_model
    client = MlflowClient()
    new = mlflow.register_model(uri, name).version
    scope = {"dataset": p.data.name, "setting": p.setting.kind, "group": group, "metric_set": metric_set}
    for k, v in {**scope, "mad": f"{mad:.6f}", "weights_sha256": provenance.weights_sha256}.items():
        client.set_model_version_tag(name, new, k, v)
    client.set_registered_model_alias(name, CANDIDATE, new)
    scoped = champion_alias(scope)
    previous = _tags_by_alias(client, name, scoped)
    gain, source = min_gain(p)
    if os.environ.get(PROMOTION_ENV) == "gate":  # inpformer retrain: the promotion gate decides
        promote = False
    promoted, reason = (
        promotion(previous, scope, mad, gain) if promote else (False, "promotion is off (or left to the gate)")
    )
    print(f"registry: version {new} {'promoted to' if promoted else 'not promoted to'} {scoped}: {reason} ({source})")
    if promoted:
        client.set_registered_model_alias(name, scoped, new)
    default = promote and should_promote(_tags_by_alias(client, name, CHAMPION), scope, mad, gain)
    if default:
        client.set_registered_model_alias(name, CHAMPION, new)
    return {
        "model_uri": uri,
        "version": new,
        "alias": scoped,
        "champion": promoted,
        "default_champion": default,
        "previous_champion_mad": float(previous.get("mad", "nan")) if previous else None,
        "reason": reason,
        "min_gain": gain,
    }
