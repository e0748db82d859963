"""Pickle-free model and training-state checkpoints (safetensors + JSON), written atomically.

Layout of a checkpoint folder::

    model.safetensors      full model state dict
    package.json           the model package (:mod:`components.scoring.package`): architecture,
                           sizes, categories, scope; its provenance names the weights' SHA-256
    train_state.safetensors / train_state.json   (training checkpoints only) optimiser tensors,
                           RNG states, schedule, epoch/iteration counters

A folder of training checkpoints holds ``ckpt-<iteration>/`` sub-folders and a ``LATEST`` file naming
the newest complete one; it is replaced atomically only after every file of the new checkpoint is
written, so an interrupted save never leaves a checkpoint that the next run trusts.

Every folder also holds ``digest.json`` (size and SHA-256 of each file, written last). Loading
verifies it; a damaged latest training checkpoint is skipped, with one warning naming the file, for
the previous intact one or a fresh start (:func:`latest_checkpoint`), and a damaged model folder
raises :class:`CheckpointError` naming the file and the fix. Folders from before digests are checked
structurally (safetensors header against the file size, JSON that parses).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.engine.rng import rng_state, set_rng_state
from components.engine.weights_file import check_weights, structure_problem, weights_metadata
from components.errors import CheckpointError
from components.files import DEFAULT_DIR_MODE, atomic_write_text, current_umask, disk_full_as_error, file_digest
from components.model import InpFormer
from components.scoring.package import (
    DEFAULT_MAX_SIDE,
    LEGACY_CONFIG_FILE,
    PACKAGE_FILE,
    ModelPackage,
    read_package,
    write_package,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DIGEST_FILE",
    "MODEL_FILES",
    "WEIGHTS_FILE",
    "CheckpointError",
    "atomic_write_text",
    "checkpoint_problem",
    "latest_checkpoint",
    "load_model",
    "load_train_state",
    "read_progress",
    "repackage",
    "rng_state",
    "save_model",
    "save_train_checkpoint",
    "set_rng_state",
    "write_digest",
]

DIGEST_FILE = "digest.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = (WEIGHTS_FILE, PACKAGE_FILE)
TRAIN_FILES = (*MODEL_FILES, "train_state.safetensors", "train_state.json")


def write_digest(folder: str | os.PathLike, files: tuple[str, ...]) -> None:
    """Record the size and SHA-256 of ``files`` in ``folder/digest.json`` (written atomically, last)."""
    folder = Path(folder)
    entries = {f: {"size": (folder / f).stat().st_size, "sha256": file_digest(folder / f)} for f in files}
    atomic_write_text(folder / DIGEST_FILE, json.dumps(entries, indent=2, sort_keys=True))


def checkpoint_problem(folder: str | os.PathLike, files: tuple[str, ...] = MODEL_FILES) -> str | None:
    """What is wrong with a model/checkpoint ``folder`` (naming the file), or None when it is intact.

    With ``digest.json``: every file's size and SHA-256. Without (older folders): structure only.
    """
    folder = Path(folder)
    for f in files:
        if not (folder / f).is_file():
            return f"{folder / f} is missing"
    digest_path = folder / DIGEST_FILE
    if digest_path.is_file():
        try:
            digest = json.loads(digest_path.read_text())
        except (ValueError, UnicodeDecodeError):
            return f"{digest_path} is not valid JSON"
        for f in files:
            entry = digest.get(f)
            if entry is None:
                return f"{folder / f} is not recorded in {digest_path}"
            size = (folder / f).stat().st_size
            if size != entry["size"]:
                return f"{folder / f} has {size} bytes, {entry['size']} were written"
            if file_digest(folder / f) != entry["sha256"]:
                return f"{folder / f} does not match the SHA-256 recorded when it was written"
        return None
    for f in files:
        why = structure_problem(folder / f)
        if why is not None:
            return f"{folder / f}: {why}"
    return None


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_model(folder: str | os.PathLike, model: InpFormer, package: ModelPackage) -> Path:
    """Save ``model`` (state dict) and ``package`` (its provenance naming the weights' SHA-256) into
    ``folder`` atomically; return it.

    Raises:
        DiskFullError: no space left (one line naming the folder and the free space; nothing of the
            new folder is left behind, the previous one is intact).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_as_error(folder):
        return _save_model(folder, model, package)


def _save_model(folder: Path, model: InpFormer, package: ModelPackage) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    tmp.chmod(DEFAULT_DIR_MODE & ~current_umask())  # as a plain mkdir would (shared remotes)
    try:
        save_file(_contiguous_cpu(model.state_dict()), str(tmp / WEIGHTS_FILE), metadata=weights_metadata(package))
        provenance = replace(package.provenance, weights_sha256=file_digest(tmp / WEIGHTS_FILE))
        write_package(tmp, replace(package, provenance=provenance))
        write_digest(tmp, MODEL_FILES)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def repackage(folder: str | os.PathLike, package: ModelPackage) -> None:
    """Replace the package of a model folder (e.g. a registered copy, now calibrated) and its digest.

    Raises:
        CheckpointError: ``package`` names other weights than the folder holds.
    """
    folder = Path(folder)
    held = file_digest(folder / WEIGHTS_FILE)
    if package.provenance.weights_sha256 and package.provenance.weights_sha256 != held:
        msg = (
            f"{folder / WEIGHTS_FILE} has SHA-256 {held[:12]}…, but the package describes "
            f"{package.provenance.weights_sha256[:12]}…: it was computed on other weights."
        )
        raise CheckpointError(msg)
    write_package(folder, replace(package, provenance=replace(package.provenance, weights_sha256=held)))
    write_digest(folder, MODEL_FILES)


def load_model(
    folder: str | os.PathLike, device: str | torch.device = "cpu", max_side: int = DEFAULT_MAX_SIDE
) -> tuple[InpFormer, ModelPackage]:
    """Rebuild an :class:`~components.model.InpFormer` and its package from a folder written by
    :func:`save_model` (or an older one with ``config.json``).

    The network comes from the package's :class:`~components.model.InpFormerConfig` (the encoder's
    weights are in the file) and the flag saying whether the encoder was pretrained is restored.
    A model folder is untrusted input: the package is read strictly (sizes at most ``max_side``),
    and a package that contradicts the weights (architecture, shapes, input side) or a malformed
    weights file raises :class:`CheckpointError` naming the file.
    """
    folder = Path(folder)
    package = read_package(folder, max_side)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        msg = f"{weights_path} is missing: {folder} is not a complete model folder (re-run training)."
        raise FileNotFoundError(msg)
    files = MODEL_FILES if (folder / PACKAGE_FILE).is_file() else (WEIGHTS_FILE, LEGACY_CONFIG_FILE)
    problem = checkpoint_problem(folder, files)
    if problem is not None:
        msg = f"{problem}: the model folder {folder} is damaged. Re-create it by training again (`dvc repro`)."
        raise CheckpointError(msg)
    check_weights(weights_path, package)
    try:
        model = InpFormer(package.model)
    except (ValueError, KeyError, TypeError, RuntimeError, AssertionError) as err:
        msg = f"{folder / PACKAGE_FILE}: its 'model' cannot be built ({type(err).__name__}: {err})."
        raise CheckpointError(msg) from err
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except Exception as err:  # safetensors' own error for shapes that contradict the offsets; torch's for mismatches
        msg = (
            f"{weights_path}: the weights do not fit the architecture in {folder / PACKAGE_FILE} "
            f"({type(err).__name__}: {str(err)[:300]}). Re-create the model folder by training again."
        )
        raise CheckpointError(msg) from err
    model.encoder.pretrained_loaded = package.encoder_pretrained
    model.encoder.weights_source = package.encoder_weights_source or "checkpoint"
    return model.to(device).eval(), package


def save_train_checkpoint(
    folder: str | os.PathLike,
    model: InpFormer,
    package: ModelPackage,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write ``folder/ckpt-<iteration>`` (model, optimiser, RNG, progress) and point LATEST at it.

    A failed write (a full disk: :class:`DiskFullError`) removes the new checkpoint; LATEST still
    names the previous one, so a rerun resumes from there.
    """
    folder = Path(folder)
    name = f"ckpt-{int(progress['global_iteration']):09d}"
    target = save_model(folder / name, model, package)
    try:
        with disk_full_as_error(target):
            _save_train_state(target, optimizer, progress)
            write_digest(target, TRAIN_FILES)
            atomic_write_text(folder / "LATEST", name)
    except BaseException:
        if (folder / "LATEST").is_file() and (folder / "LATEST").read_text().strip() == name:
            raise  # LATEST names it already: it is complete
        shutil.rmtree(target, ignore_errors=True)
        raise
    old = sorted(p for p in folder.glob("ckpt-*") if p.is_dir() and p.name != name)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return target


def _save_train_state(target: Path, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    """``train_state.safetensors`` (optimiser tensors, RNG) and ``train_state.json``."""
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_meta: dict[str, Any] = {"param_groups": [], "steps": {}}
    index = {id(p): i for i, p in enumerate(pp for g in optimizer.param_groups for pp in g["params"])}
    for g in optimizer.param_groups:
        opt_meta["param_groups"].append({k: v for k, v in g.items() if k != "params"})
    for p, st in optimizer.state.items():
        i = index[id(p)]
        for k, v in st.items():
            if torch.is_tensor(v):
                opt_tensors[f"opt.{i}.{k}"] = v
            else:
                opt_meta["steps"][f"{i}.{k}"] = v
    rng_tensors, rng_meta = rng_state()
    save_file(_contiguous_cpu({**opt_tensors, **rng_tensors}), str(target / "train_state.safetensors"))
    state = {"progress": progress, "optimizer": opt_meta, "rng": rng_meta}
    (target / "train_state.json").write_text(json.dumps(state, default=str))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint: the one LATEST points at, else the newest older one that
    verifies (:func:`checkpoint_problem`), else None (a fresh start). Skipping a damaged one logs one
    warning naming the file."""
    folder = Path(folder)
    latest = folder / "LATEST"
    if not latest.is_file():
        return None
    newest = folder / latest.read_text().strip()
    older = sorted((p for p in folder.glob("ckpt-*") if p.is_dir() and p.name < newest.name), reverse=True)
    for target in [newest, *older]:
        problem = checkpoint_problem(target, TRAIN_FILES)
        if problem is None:
            return target
        fallback = next((p.name for p in older if p.name < target.name), "a fresh start")
        logger.warning("checkpoint damaged: %s; resuming from %s instead.", problem, fallback)
    return None


def read_progress(target: str | os.PathLike) -> dict[str, Any]:
    """The progress dict (phase, epoch, batch, iterations, history) of a training checkpoint."""
    return json.loads((Path(target) / "train_state.json").read_text())["progress"]


def load_train_state(
    target: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str
) -> dict[str, Any]:
    """Restore model, optimiser and RNG from a training checkpoint; return its progress dict."""
    target = Path(target)
    model.load_state_dict(load_file(str(target / "model.safetensors"), device=str(device)), strict=True)
    tensors = load_file(str(target / "train_state.safetensors"))
    state = json.loads((target / "train_state.json").read_text())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for g, saved in zip(optimizer.param_groups, state["optimizer"]["param_groups"]):
        g.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            optimizer.state[params[int(i)]][name] = value.to(params[int(i)].device)
    for key, value in state["optimizer"]["steps"].items():
        i, name = key.split(".", 1)
        optimizer.state[params[int(i)]][name] = value
    set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, state["rng"])
    return state["progress"]
