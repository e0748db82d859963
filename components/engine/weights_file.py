"""The safetensors weights file of a model folder: whether its header is whole, and what it records
about the input its weights were trained at (a model file is untrusted input)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import safe_open

from components.errors import CheckpointError
from components.scoring.package import PACKAGE_FILE, ModelPackage

__all__ = ["INPUT_SIZE_KEY", "check_weights", "structure_problem", "weights_metadata"]

HEADER_LENGTH_BYTES = 8  # a safetensors file starts with the little-endian u64 length of its JSON header


def structure_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors/JSON file (None when it looks whole)."""
    size = path.stat().st_size
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            return f"not valid JSON ({err})"
        return None
    with open(path, "rb") as fh:
        head = fh.read(HEADER_LENGTH_BYTES)
        if len(head) < HEADER_LENGTH_BYTES:
            return f"{size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - HEADER_LENGTH_BYTES:
            return f"header length {n} exceeds the file size {size}"
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as err:
            return f"unreadable safetensors header ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = HEADER_LENGTH_BYTES + n + max(ends, default=0)
    return None if expected == size else f"{size} bytes, the header says {expected}"


INPUT_SIZE_KEY = "inpformer.input_size"  # safetensors metadata: the input side the weights were trained at


def weights_metadata(package: ModelPackage) -> dict[str, str]:
    """What the weights file itself says about its training input (the crop side): the encoder's
    position embeddings interpolate to any size, so nothing else in the file would contradict a
    package that names another one."""
    return {INPUT_SIZE_KEY: str(package.crop)}


def check_weights(path: Path, package: ModelPackage) -> None:
    """The weights file's header is readable and its input side (when recorded) is the package's.

    Raises:
        CheckpointError: naming the file and what contradicts it.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            recorded = (fh.metadata() or {}).get(INPUT_SIZE_KEY)
    except Exception as err:  # safetensors raises its own error type for every malformed header
        msg = f"{path}: not a readable safetensors file ({err}). Re-create the model folder by training again."
        raise CheckpointError(msg) from err
    if recorded is not None and recorded != str(package.crop):
        msg = (
            f"{path} was trained at input side {recorded}, but {path.parent / PACKAGE_FILE} says {package.crop} "
            "(the architecture's image_size): the package does not describe these weights."
        )
        raise CheckpointError(msg)
