"""The model package: what a model folder, a registered version and an exported file say about their weights.

One frozen :class:`ModelPackage` holds the architecture (:class:`~components.model.InpFormerConfig`),
the transform's resize side (the crop side is the architecture's input size), the categories and
the training scope (group, dataset, setting, encoder weights), and, once the evaluate stage has
calibrated it, the :class:`~components.scoring.inference.ScoringConfig` and the per-category
:class:`~components.scoring.decision.CategoryThresholds`. A provenance block ties it to its bytes
(the weights' SHA-256) and to what produced them (data manifest hash, params hash, git commit,
library versions). Each value is stored once.

It is written as one JSON file, ``package.json``, by :meth:`ModelPackage.to_json` alone (model
folders, training checkpoints and registered versions through :func:`write_package`, exported
files inside their metadata) and read by :meth:`ModelPackage.from_json` alone
(:func:`read_package` for folders, which also reads the ``config.json`` + ``scoring.json`` of
folders written before the package existed).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from components.constants import MAX_TILE_OVERLAP
from components.data.transforms import GEOMETRIES, ImageTransform
from components.files import atomic_write_text
from components.model.config import InpFormerConfig
from components.scoring.decision import CategoryThresholds, DecisionRule
from components.scoring.drift import DriftReference
from components.scoring.inference import ScoringConfig
from components.scoring.schema import DEFAULT_MAX_SIDE, PackageError, check_bounds, check_types

__all__ = [
    "DEFAULT_MAX_SIDE",
    "PACKAGE_FILE",
    "ModelPackage",
    "PackageError",
    "Provenance",
    "check_bounds",
    "check_types",
    "read_package",
    "write_package",
]

PACKAGE_FILE = "package.json"
SCHEMA = 1  # the layout of package.json; readers refuse newer ones
LEGACY_CONFIG_FILE, LEGACY_SCORING_FILE = "config.json", "scoring.json"  # folders from before the package


@dataclass(frozen=True)
class Provenance:
    """What ties a package to its bytes and to what produced them (empty string: not recorded).

    ``git_commit`` and ``libraries`` are recorded at registration only, so the DVC outputs of the
    same code, data and params stay byte-identical across commits.
    """

    weights_sha256: str = ""
    manifest_hash: str = ""
    params_hash: str = ""
    git_commit: str = ""
    libraries: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelPackage:
    """Everything besides the weights that scoring a model's images needs (see the module docstring).

    Args:
        model: the architecture; its ``image_size`` is the centre-crop side.
        resize: side of the square resize before the crop (``center_crop`` geometry).
        geometry: the model's field of view (:data:`~components.data.transforms.GEOMETRIES`).
        tile, tile_overlap: the tiles of the ``tile`` geometry (original pixels; least overlap).
        categories: the categories the model was trained on.
        group, dataset, setting: the training scope.
        encoder_pretrained, encoder_weights_source: whether (and from where) DINOv2 weights were loaded.
        scoring: map kind and post-processing (None until the evaluate stage calibrates the package).
        thresholds: per-category thresholds (empty until calibrated).
        normalize: report normalised scores (0.5 = threshold).
        threshold_split: the split the thresholds were calibrated on.
        provenance: weights digest and what produced them.
        drift: per category, the reference scoring runs are compared with (components/scoring/drift.py).
    """

    model: InpFormerConfig
    resize: int
    categories: tuple[str, ...] = ()
    group: str = "all"
    dataset: str = ""
    setting: str = ""
    encoder_pretrained: bool = False
    encoder_weights_source: str = ""
    scoring: ScoringConfig | None = None
    thresholds: dict[str, CategoryThresholds] = field(default_factory=dict)
    normalize: bool = False
    threshold_split: str = ""
    provenance: Provenance = field(default_factory=Provenance)
    geometry: str = "center_crop"
    tile: int = 0
    tile_overlap: float = 0.25
    drift: dict[str, DriftReference] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", tuple(str(c) for c in self.categories))
        if self.crop > self.resize:
            msg = f"the crop side {self.crop} exceeds the resize side {self.resize}."
            raise PackageError(msg)
        if self.geometry not in GEOMETRIES:
            raise PackageError(f"'geometry' must be one of {GEOMETRIES}, got {self.geometry!r}.")
        if not 0.0 <= self.tile_overlap <= MAX_TILE_OVERLAP:
            raise PackageError(f"'tile_overlap' must be in [0, {MAX_TILE_OVERLAP}], got {self.tile_overlap!r}.")

    @property
    def crop(self) -> int:
        """The centre-crop side: the architecture's input size."""
        size = self.model.image_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def calibrated(self) -> bool:
        """Whether the evaluate stage has set scoring and thresholds."""
        return self.scoring is not None

    def transform(self) -> ImageTransform:
        """The preprocessing of the model's images."""
        return ImageTransform(
            resize=self.resize, crop=self.crop, geometry=self.geometry, tile=self.tile, tile_overlap=self.tile_overlap
        )

    def rule(self, normalized: bool | None = None) -> DecisionRule:
        """The per-category decision rule (normalised as recorded unless ``normalized`` says otherwise)."""
        return DecisionRule(dict(self.thresholds), self.normalize if normalized is None else normalized)

    def calibrate(self, scoring: ScoringConfig, thresholds: dict[str, CategoryThresholds], **kw: Any) -> ModelPackage:
        """A copy with scoring and thresholds (and ``normalize`` / ``threshold_split`` / ``provenance``)."""
        return replace(self, scoring=scoring, thresholds=dict(thresholds), **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN thresholds stay NaN, as Python's json writes them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model"] = self.model.to_dict()
        out["categories"] = list(self.categories)
        out["scoring"] = None if self.scoring is None else asdict(self.scoring)
        out["thresholds"] = {c: t.to_dict() for c, t in self.thresholds.items()}
        out["provenance"] = asdict(self.provenance)
        out["drift"] = {c: r.to_dict() for c, r in self.drift.items()}
        if not self.drift:  # packages without a reference keep their bytes
            del out["drift"]
        return {"schema": SCHEMA, **out}

    def to_json(self) -> str:
        """The one serialisation of a package (sorted keys, so equal packages are equal bytes)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str = "package", max_side: int = DEFAULT_MAX_SIDE) -> ModelPackage:
        """Inverse of :meth:`to_dict`, strict: every key of its type (:func:`check_types`; ``"false"``
        is not a bool), sizes bounded (:func:`check_bounds`). Raises :class:`PackageError` naming
        ``where`` and the key."""
        if not isinstance(data, dict):
            raise PackageError(f"{where}: a model package is a JSON object, got {type(data).__name__}.")
        data = dict(data)
        schema = data.pop("schema", SCHEMA)
        if isinstance(schema, bool) or schema != SCHEMA:
            raise PackageError(f"{where}: package schema {schema!r}; this inpformer reads schema {SCHEMA}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PackageError(f"{where}: unknown package keys {unknown} (known: {sorted(known)}).")
        for key in ("model", "resize"):
            if key not in data:
                raise PackageError(f"{where}: the package has no '{key}'.")
        try:
            values = dict(data)
            values["model"] = InpFormerConfig.from_dict(_typed(InpFormerConfig, data["model"], where, "model"))
            values["resize"] = _integer(data["resize"], where, "resize")
            if data.get("scoring") is not None:
                values["scoring"] = ScoringConfig.from_dict(_typed(ScoringConfig, data["scoring"], where, "scoring"))
            thresholds = _object(data.get("thresholds") or {}, where, "thresholds")
            values["thresholds"] = {
                str(c): CategoryThresholds.from_dict(_typed(CategoryThresholds, t, where, f"thresholds.{c}"))
                for c, t in thresholds.items()
            }
            drift = _object(data.get("drift") or {}, where, "drift")
            values["drift"] = {str(c): DriftReference.from_dict(r) for c, r in drift.items()}
            provenance = _typed(Provenance, data.get("provenance") or {}, where, "provenance")
            values["provenance"] = Provenance(**provenance)
            nested = ("model", "scoring", "thresholds", "provenance", "drift")
            top = {k: v for k, v in data.items() if k not in nested}
            check_types(cls, top, where)  # the scalar fields, typed as the dataclass declares them
        except PackageError:
            raise
        except (TypeError, ValueError) as err:
            raise PackageError(f"{where}: {err}") from err
        try:
            package = cls(**values)
        except (TypeError, ValueError) as err:  # PackageError too: the cross-field checks
            raise PackageError(f"{where}: {err}") from err
        check_bounds(package, where, max_side)
        return package

    @classmethod
    def from_json(cls, text: str, where: str = "package", max_side: int = DEFAULT_MAX_SIDE) -> ModelPackage:
        """The one reader of a package's JSON (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise PackageError(f"{where}: not valid JSON ({err}).") from err
        return cls.from_dict(data, where, max_side)


def _typed(cls: type, value: Any, where: str, key: str) -> dict[str, Any]:
    """``value`` as a JSON object whose keys have ``cls``'s field types."""
    data = _object(value, where, key)
    check_types(cls, data, where, key + ".")
    return data


def _object(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PackageError(f"{where}: '{key}' must be a JSON object, got {type(value).__name__}.")
    return value


def _integer(value: Any, where: str, key: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise PackageError(f"{where}: '{key}' must be an integer, got {value!r}.")
    return int(value)


def write_package(folder: str | os.PathLike, package: ModelPackage) -> Path:
    """Write ``folder/package.json`` atomically; return its path."""
    path = Path(folder) / PACKAGE_FILE
    atomic_write_text(path, package.to_json())
    return path


def read_package(folder: str | os.PathLike, max_side: int = DEFAULT_MAX_SIDE) -> ModelPackage:
    """The package of a model folder (``package.json``; older folders: ``config.json`` + ``scoring.json``).

    Raises:
        FileNotFoundError: the folder holds neither.
        PackageError: the JSON cannot describe a model (naming the file and the key).
    """
    folder = Path(folder)
    path = folder / PACKAGE_FILE
    if path.is_file():
        return ModelPackage.from_json(_text(path), str(path), max_side)
    legacy = folder / LEGACY_CONFIG_FILE
    if not legacy.is_file():
        msg = f"{path} is missing: {folder} is not a model folder (re-run training)."
        raise FileNotFoundError(msg)
    return ModelPackage.from_dict(_from_legacy(folder), str(legacy), max_side)


MAX_PACKAGE_BYTES = 16 * 2**20  # a package is a few KiB; more is not a package


def _text(path: Path) -> str:
    if path.stat().st_size > MAX_PACKAGE_BYTES:
        raise PackageError(f"{path}: {path.stat().st_size} bytes, not a model package (at most {MAX_PACKAGE_BYTES}).")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PackageError(f"{path}: not UTF-8 text ({err}).") from err


def _from_legacy(folder: Path) -> dict[str, Any]:
    """A package dict from a pre-package folder's ``config.json`` (and ``scoring.json`` if registered)."""
    config = _object(_json(folder / LEGACY_CONFIG_FILE), str(folder), LEGACY_CONFIG_FILE)
    data: dict[str, Any] = {"model": config.get("model"), "resize": config.get("image_size")}
    for key in ("group", "dataset", "setting", "encoder_pretrained", "encoder_weights_source", "categories"):
        if key in config:
            data[key] = config[key]
    scoring_file = folder / LEGACY_SCORING_FILE
    if scoring_file.is_file():
        settings = _object(_json(scoring_file), str(scoring_file), LEGACY_SCORING_FILE)
        for key in ("scoring", "thresholds", "normalize", "threshold_split"):
            if key in settings:
                data[key] = settings[key]
    return data


def _json(path: Path) -> Any:
    try:
        return json.loads(_text(path))
    except (ValueError, RecursionError) as err:
        if isinstance(err, PackageError):
            raise
        raise PackageError(f"{path}: not valid JSON ({err}).") from err
