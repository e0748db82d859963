"""Pickle-free model and training-state checkpoints (safetensors + JSON), written atomically.

Layout of a checkpoint folder::

    model.safetensors      full model state dict
    config.json            model constructor kwargs + metadata (thresholds, pretrained flag, ...)
    train_state.safetensors / train_state.json   (training checkpoints only) optimiser tensors,
                           RNG states, schedule, epoch/iteration counters

A folder of training checkpoints holds ``ckpt-<iteration>/`` sub-folders and a ``LATEST`` file naming
the newest complete one; it is replaced atomically only after every file of the new checkpoint is
written, so an interrupted save never leaves a checkpoint that the next run trusts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from components.files import atomic_write_text
from components.model import InpFormer, InpFormerConfig

__all__ = [
    "atomic_write_text",
    "latest_checkpoint",
    "load_model",
    "load_train_state",
    "read_progress",
    "rng_state",
    "save_model",
    "save_train_checkpoint",
    "set_rng_state",
]


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_model(folder: str | os.PathLike, model: torch.nn.Module, config: dict[str, Any]) -> Path:
    """Save ``model`` (state dict) and ``config`` (JSON) into ``folder`` atomically; return it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_file(_contiguous_cpu(model.state_dict()), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[InpFormer, dict[str, Any]]:
    """Rebuild an :class:`~components.model.InpFormer` from a folder written by :func:`save_model`.

    The network comes from the stored :class:`InpFormerConfig` (the encoder's weights are in the
    file) and the flag saying whether the encoder was pretrained is restored from the config.
    """
    folder = Path(folder)
    cfg_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            msg = f"{p} is missing: {folder} is not a complete model folder (re-run training)."
            raise FileNotFoundError(msg)
    config = json.loads(cfg_path.read_text())
    model = InpFormer.from_config(InpFormerConfig.from_dict(config["model"]))
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    model.encoder.pretrained_loaded = bool(config.get("encoder_pretrained", False))
    model.encoder.weights_source = str(config.get("encoder_weights_source", "checkpoint"))
    return model.to(device).eval(), config


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture torch (CPU and CUDA), numpy and Python RNG states as (tensors, JSON-able)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_train_checkpoint(
    folder: str | os.PathLike,
    model: torch.nn.Module,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write ``folder/ckpt-<iteration>`` (model, optimiser, RNG, progress) and point LATEST at it."""
    folder = Path(folder)
    name = f"ckpt-{int(progress['global_iteration']):09d}"
    target = save_model(folder / name, model, config)
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
    atomic_write_text(folder / "LATEST", name)
    old = sorted(p for p in folder.glob("ckpt-*") if p.is_dir() and p.name != name)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return target


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint LATEST points at, or None when there is no complete one."""
    latest = Path(folder) / "LATEST"
    if not latest.is_file():
        return None
    target = Path(folder) / latest.read_text().strip()
    needed = ("model.safetensors", "config.json", "train_state.safetensors", "train_state.json")
    return target if all((target / f).is_file() for f in needed) else None


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
