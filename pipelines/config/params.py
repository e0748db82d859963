"""params.yaml: the single source of every tunable value, validated once by pydantic.

The defaults below are the paper's configuration (``params.paper.yaml`` equals them, a test checks
it); ``params.yaml`` is the CPU-sized demo on top. Allowed values come from the components'
constants. Unknown keys and wrong types are rejected with the key's dotted name and the allowed
values, before any work starts. ``--set KEY=VALUE`` overrides are parsed as YAML scalars and
validated the same way. A missing or empty params file is an error, never "all defaults".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from components.constants import (
    AMP_MODES,
    ATTENTION_MODES,
    CACHE_VERIFY_MODES,
    COHERENCE_KINDS,
    DATASET_KINDS,
    ENCODER_DTYPES,
    FUSED_L2_NORMS,
    MAP_KINDS,
    MAX_TILE_OVERLAP,
    MSE_REDUCTIONS,
    PATCH_SIZE,
    POS_EMBED_INTERPOLATIONS,
    RESIDUAL_MODES,
    SEG_HEAD_LAYOUTS,
)
from pipelines.config.base import SETTING_KINDS, ConfigError, Device, Seed, Slug, StrictParams, check_slug
from pipelines.config.deploy import ExportParams, ServeParams, ThresholdParams
from pipelines.config.loop import DriftParams, ReviewParams
from pipelines.config.overrides import OverrideError, apply_overrides, flatten, set_dotted

__all__ = ["ConfigError", "Params", "apply_overrides", "check_slug", "flatten", "load_params", "set_dotted"]


class SettingParams(StrictParams):
    """Which of the paper's settings to run."""

    kind: Literal[SETTING_KINDS] = "multi_class"  # type: ignore[valid-type]
    few_shot_k: int = Field(4, ge=1)
    semi_supervised_n: int = Field(10, ge=1)
    zero_shot_source: str = ""  # folder of a trained model (source dataset) for zero-shot


class SyntheticParams(StrictParams):
    """The embedded default dataset."""

    seed: Seed = 0
    size: int = Field(128, ge=32)
    n_train: int = Field(60, ge=1)
    n_test_good: int = Field(10, ge=1)
    n_test_per_defect: int = Field(3, ge=1)
    categories: list[str] = Field(default_factory=lambda: ["brick", "grass", "gravel", "washer"])


class ExtractParams(StrictParams):
    """Limits on archive extraction (decompression bombs); generous defaults."""

    max_gb: float = Field(500.0, gt=0)
    max_ratio: float = Field(200.0, gt=1)
    max_members: int = Field(5_000_000, ge=1)


class DataParams(StrictParams):
    """Where images come from and how they are shaped."""

    dataset: Literal[DATASET_KINDS] = "mvtec"  # type: ignore[valid-type]
    name: Slug = "mvtec"
    source: str = ""  # --from: an archive or folder for air-gapped machines
    extra_sources: list[Slug] = Field(default_factory=list)  # more prepared names (super-multi-class)
    categories: list[str] = Field(default_factory=list)
    image_size: int = Field(448, ge=14)
    crop_size: int = Field(392, ge=14)
    # the model's field of view: auto = center_crop (the paper's) for benchmark datasets, full for your own
    geometry: Literal["auto", "center_crop", "full", "letterbox", "tile"] = "auto"
    tile_size: int = Field(0, ge=0)  # tile geometry: tile side in original pixels (0: crop_size, native resolution)
    tile_overlap: float = Field(0.25, ge=0.0, le=MAX_TILE_OVERLAP)  # tile geometry: least overlap of neighbours
    masks: Literal["required", "optional", "none"] = "optional"  # folder datasets: defect images without masks
    num_workers: int = Field(4, ge=0)
    cache: bool = True
    skip_bad: bool = False
    extract: ExtractParams = Field(default_factory=ExtractParams)
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)

    @model_validator(mode="after")
    def _sizes(self) -> DataParams:
        if self.crop_size > self.image_size:
            msg = f"data.crop_size ({self.crop_size}) must not exceed data.image_size ({self.image_size})"
            raise ValueError(msg)
        if self.tile_size and self.tile_size < PATCH_SIZE:
            msg = f"data.tile_size ({self.tile_size}) must be 0 (the crop size) or at least the patch size {PATCH_SIZE}"
            raise ValueError(msg)
        if self.crop_size % PATCH_SIZE:
            msg = f"data.crop_size ({self.crop_size}) must be a multiple of the patch size {PATCH_SIZE}"
            raise ValueError(msg)
        return self


class SynthesisParams(StrictParams):
    """Pseudo anomalies for the INP-Former++ head (spec §13.6)."""

    enabled: bool = True
    texture_dir: str = "data/raw/dtd/extracted/dtd/images"  # empty: procedural textures
    empty_prob: float = Field(0.5, ge=0, le=1)
    beta_max: float = Field(0.8, ge=0, le=1)
    num_augmenters: int = Field(3, ge=0, le=10)
    max_perlin_exponent: int = Field(6, ge=1, le=8)
    threshold: float = 0.5
    rotate_prob: float = Field(0.3, ge=0, le=1)
    bank_copies: int = Field(0, ge=0)  # 0: synthesise on the fly every epoch
    seed: Seed = 0


class ModelParams(StrictParams):
    """INP-Former(++) architecture (spec §3–§7, §13.4)."""

    encoder: str = "dinov2reg_vit_base_14"
    pretrained: bool | Literal["auto"] = "auto"
    weights: str = ""
    weights_dir: str = "weights"
    download: bool = True
    num_prototypes: int = Field(6, ge=1)
    taps: list[int] | None = None
    encoder_groups: list[list[int]] = Field(default_factory=lambda: [[0, 1, 2, 3], [4, 5, 6, 7]])
    decoder_groups: list[list[int]] = Field(default_factory=lambda: [[0, 1, 2, 3], [4, 5, 6, 7]])
    decoder_depth: int = Field(8, ge=1)
    extractor_depth: int = Field(1, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    norm_eps: float = Field(1e-8, gt=0)
    bottleneck_dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.01, gt=0)
    init_bound: float = Field(0.03, gt=0)
    pos_embed_interp: Literal[POS_EMBED_INTERPOLATIONS] = "official"  # type: ignore[valid-type]
    encoder_fused_attn: bool = False
    attention: Literal[ATTENTION_MODES] = "explicit"  # type: ignore[valid-type]  # explicit | sdpa | auto
    encoder_dtype: Literal[ENCODER_DTYPES] = "fp32"  # type: ignore[valid-type]  # bf16: frozen encoder in bf16
    seg_head: Literal[(*SEG_HEAD_LAYOUTS, "none")] = "onenip"  # type: ignore[valid-type]
    seg_head_channels: int = Field(256, ge=1)
    encoder_overrides: dict[str, int] = Field(default_factory=dict)  # dev/tests: tiny encoders (no real weights)


class LossParams(StrictParams):
    """L = L_sm + λ·L_coh (+ β·L_seg) (spec §8, §13)."""

    gamma: float = Field(3.0, ge=0)
    lam: float = Field(0.2, ge=0)
    coherence: Literal[COHERENCE_KINDS] = "soft"  # type: ignore[valid-type]
    soft_temperature: float = Field(1.0, gt=0)
    mse_weight: float = Field(1.0, ge=0)
    mse_gamma: float | None = None
    mse_reduction: Literal[MSE_REDUCTIONS] = "mean"  # type: ignore[valid-type]
    seg_weight: float = Field(1.0, ge=0)
    dice_eps: float = Field(1e-6, gt=0)
    dice_only_anomalous: bool = True


class TrainParams(StrictParams):
    """Optimisation (spec §9) and run control."""

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, ge=0)
    final_lr: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(100, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-10, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    amsgrad: bool = True
    clip_threshold: float = Field(1.0, gt=0)
    grad_clip: float = Field(0.1, ge=0)
    head_grad_clip: float = Field(0.1, ge=0)
    head_lr_scale: float = Field(1.0, gt=0)
    residual_mode: Literal[RESIDUAL_MODES] = "joint"  # type: ignore[valid-type]
    head_epochs: int = Field(100, ge=0)
    device: Device = "auto"
    amp: Literal[AMP_MODES] = "none"  # type: ignore[valid-type]
    tf32: bool = False  # TF32 matmuls on Ampere and newer GPUs
    compile: bool = False  # torch.compile, eager again if compiling fails
    checkpoint_every: int = Field(1000, ge=0)
    log_every: int = Field(1, ge=1)  # iterations between loss logs / NaN checks / MLflow step metrics (a GPU sync each)
    progress_every_s: float = Field(30.0, gt=0)  # without a progress bar (dvc repro): a line this often
    keep_checkpoints: int = Field(2, ge=1)  # a damaged newest checkpoint falls back to an older one
    deterministic: bool = True
    num_threads: int = Field(0, ge=0)  # CPU threads of train and evaluate (0: torch's default, all cores)
    feature_cache: bool = False  # cache the frozen encoder's outputs (fp16, memory-mapped) across epochs
    feature_cache_verify: Literal[CACHE_VERIFY_MODES] = "full"  # type: ignore[valid-type]
    feature_cache_dtype: Literal["fp16", "fp32"] = "fp16"  # fp32: the encoder's exact values, twice the bytes


class EvalParams(StrictParams):
    """Anomaly maps, post-processing and metrics (spec §12, §13.8)."""

    map: Literal[("auto", *MAP_KINDS)] = "auto"  # type: ignore[valid-type]
    resize: int = Field(256, ge=8)
    blur_kernel: int = Field(5, ge=0)
    blur_sigma: float = Field(4.0, gt=0)
    top_ratio: float = Field(0.01, ge=0, le=1)
    fused_l2_norm: Literal[FUSED_L2_NORMS] = "none"  # type: ignore[valid-type]
    metrics_mode: Literal["exact", "binned"] = "exact"
    fpr_limit: float = Field(0.3, gt=0, le=1)
    curve_points: int = Field(200, ge=2)  # points per curve CSV in metrics/curves (DVC plots)
    batch_size: int = Field(16, ge=1)
    plots: bool = True
    grid_images: int = Field(8, ge=0)
    allow_untested: bool = False  # categories without test images: error (false), or reported and never promoted
    min_mask_coverage: float = Field(0.95, ge=0, le=1)  # warn below this share of defect pixels in the field of view
    threshold: ThresholdParams = Field(default_factory=ThresholdParams)


class TrackingParams(StrictParams):
    """MLflow tracking and registry."""

    enabled: bool = True
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    experiment: str = "inpformer"
    registered_model: str = "inpformer"
    log_model: bool = True
    required: bool = False  # true: a tracking error stops the stage; false: it warns and the work goes on
    timeout_s: float = Field(10.0, gt=0)  # wait this long for a locked SQLite tracking database


class RegistryParams(StrictParams):
    """The champion gate (promotion in the MLflow registry; no output depends on it: not a stage param)."""

    min_gain: Literal["auto"] | float = "auto"  # mAD gain over the champion to promote; auto: from the noise floor
    noise_multiple: float = Field(2.0, ge=0)  # auto: this many std of the scope's measured mAD (inpformer noise)
    reproduce_tolerance: float = Field(0.02, ge=0)  # inpformer reproduce, per metric, when no noise was measured

    @model_validator(mode="after")
    def _gain(self) -> RegistryParams:
        if self.min_gain != "auto" and not 0 <= float(self.min_gain) < 1:
            raise ValueError(f"registry.min_gain ({self.min_gain}) must be auto or a mAD difference in [0, 1)")
        return self


class SweepParams(StrictParams):
    """Optuna sweeps (M, γ, λ, ...)."""

    study: Slug = "inpformer-sweep"
    storage: str = "sqlite:///artifacts/sweep/optuna.db"
    prefect_pool: str = ""  # a Prefect work pool: workers run as its flow runs ('' : local processes)
    n_trials: int = Field(20, ge=1)
    timeout_s: float | None = None
    seed: Seed = 0
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: str = "mad"
    objective_split: Literal["validation", "test"] = "validation"
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    pruner: Literal["median", "wilcoxon", "none"] = "median"
    heartbeat_s: int = Field(10, ge=1)  # a worker's liveness signal; its trial fails after grace_s of silence
    grace_s: int = Field(30, ge=2)
    space: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "model.num_prototypes": {"type": "int", "low": 2, "high": 12},
            "loss.gamma": {"type": "float", "low": 0.0, "high": 5.0},
            "loss.lam": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
        }
    )


class LimitsParams(StrictParams):
    """Guards that only refuse or wait (no output depends on them: never a DVC stage param)."""

    lock_wait_s: float = Field(0.0, ge=0)  # a second writer of the workspace / an --out waits this long, then fails
    max_model_side: int = Field(2048, ge=14)  # model files may not ask for a larger input side (memory bound)
    memory_fraction: float = Field(0.9, gt=0, le=1)  # refuse work whose estimated peak exceeds this share
    allow_stale_thresholds: bool = False  # predict/app/scoring: warn instead of refusing other weights' thresholds


class Params(StrictParams):
    """The whole of params.yaml."""

    seed: Seed = 1
    setting: SettingParams = Field(default_factory=SettingParams)
    data: DataParams = Field(default_factory=DataParams)
    synthesis: SynthesisParams = Field(default_factory=SynthesisParams)
    model: ModelParams = Field(default_factory=ModelParams)
    loss: LossParams = Field(default_factory=LossParams)
    train: TrainParams = Field(default_factory=TrainParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    sweep: SweepParams = Field(default_factory=SweepParams)
    export: ExportParams = Field(default_factory=ExportParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    limits: LimitsParams = Field(default_factory=LimitsParams)
    review: ReviewParams = Field(default_factory=ReviewParams)
    drift: DriftParams = Field(default_factory=DriftParams)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            model: Any = Params
            for p in parent:
                field = model.model_fields.get(str(p))
                model = field.annotation if field is not None else None
                if model is None or not isinstance(model, type) or not issubclass(model, BaseModel):
                    break
            allowed = sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
            lines.append(f"  {key}: unknown key (allowed here: {', '.join(allowed)})")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_params(path: str | os.PathLike = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate a params file.

    Raises:
        ConfigError: the file is missing, empty or invalid, or an override is; the message names
            the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"params file {path} not found (copy params.yaml or params.paper.yaml from the repository)."
        raise ConfigError(msg)
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        msg = f"{path}: not valid YAML ({err})"
        raise ConfigError(msg) from err
    if tree is None:
        msg = f"{path} is empty: write the params to use (e.g. copy params.paper.yaml) rather than relying on defaults."
        raise ConfigError(msg)
    if not isinstance(tree, dict):
        msg = f"{path}: expected a mapping of sections, got {type(tree).__name__}"
        raise ConfigError(msg)
    try:
        tree = apply_overrides(tree, overrides or [])
    except OverrideError as err:
        raise ConfigError(str(err)) from err
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(path) + (" (with --set overrides)" if overrides else ""))) from err
