"""The one training path: a group's model, settings, losses and the dataset it trains on.

:func:`assemble_training` is used by the train stage and by the sweep objective, so a sweep tunes
exactly what ``train`` trains:
normal images (+ the fixed pseudo-anomaly bank or on-the-fly synthesis when residual learning is
on), wrapped per setting (few-shot augmentation, semi-supervised pasting of real anomalies) or,
for the plain settings, served from the encoder-feature cache when ``train.feature_cache``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.utils.data import Dataset

from components.data.cache import ImageCache
from components.data.datasets import ImageDataset, Record
from components.data.fewshot import FewShotDataset, select_shots
from components.data.semi import SemiSupervisedDataset
from components.engine.distributed import DistContext
from components.engine.feature_cache import CacheSettings, cached_dataset
from components.engine.losses import DiceLoss, NormalPatternLoss
from components.engine.train_config import TrainConfig, seed_everything
from components.model import InpFormer
from pipelines.builders import (
    build_loss,
    build_model,
    build_synthesizer,
    build_train_config,
    build_transform,
    check_memory,
    cpu_runtime,
    residual_mode,
)
from pipelines.config import Params
from pipelines.paths import FEATURE_CACHE_DIR, IMAGE_CACHE_DIR
from pipelines.stages.records import pseudo_anomaly_bank, semi_supervised_anomalies

__all__ = ["TrainingJob", "assemble_training", "training_dataset"]


@dataclass(frozen=True)
class TrainingJob:
    """What :func:`components.engine.training.train` takes for one group."""

    model: InpFormer
    dataset: Dataset
    cfg: TrainConfig
    loss: NormalPatternLoss
    dice: DiceLoss


def assemble_training(
    p: Params, group_records: list[Record], all_records: list[Record], progress: bool, ctx: DistContext | None = None
) -> TrainingJob:
    """Seed, build the model (encoder weights as ``model.pretrained`` says), the settings, the losses
    and the dataset of one group, in the official order (seed first, per group).

    Under DDP (``ctx``) rank 0 builds the encoder-feature cache first; the others wait, then read it.
    """
    ctx = ctx or DistContext()
    seed_everything(p.seed, p.train.deterministic)  # per group, as the official single-class loop
    model = build_model(p)
    cfg = replace(build_train_config(p, progress and ctx.main), parallel=ctx)
    if ctx.active and cfg.device.startswith("cuda"):
        cfg = replace(cfg, device=f"cuda:{ctx.local_rank}")
    check_memory(p, model, p.train.batch_size, cfg.device, "train.batch_size", training=True)
    loss, dice = build_loss(p)
    if not ctx.main:
        ctx.barrier()  # rank 0 builds the encoder-feature cache first
    dataset = training_dataset(p, group_records, all_records, model, cfg.device, progress and ctx.main)
    if ctx.main:
        ctx.barrier()
    return TrainingJob(model, dataset, cfg, loss, dice)


def training_dataset(
    p: Params, group_records: list[Record], all_records: list[Record], model: InpFormer, device: str, progress: bool
) -> Dataset:
    """The training dataset of one group (``model`` only feeds the feature cache)."""
    tf = build_transform(p)
    synth = build_synthesizer(p) if residual_mode(p) != "off" else None
    kind = p.setting.kind
    records = select_shots(group_records, p.setting.few_shot_k, seed=p.seed) if kind == "few_shot" else group_records
    bank = pseudo_anomaly_bank(p, records) if synth is not None else None
    cache = ImageCache(IMAGE_CACHE_DIR) if p.data.cache else None
    dataset = ImageDataset(records, tf, synth, seed=p.synthesis.seed, cache=cache, bank=bank)
    if kind == "few_shot":
        return FewShotDataset(dataset, seed=p.seed)
    if kind == "semi_supervised":
        return SemiSupervisedDataset(dataset, semi_supervised_anomalies(p, all_records), tf, seed=p.seed)
    if p.train.feature_cache:
        runtime = cpu_runtime()  # features computed under other CPU kernels or threads round differently
        arithmetic = (device, runtime["cpu_kernels"], runtime["mkl_cbwr"], runtime["onednn"], runtime["num_threads"])
        tr = p.train
        settings = CacheSettings(
            device, progress, tr.feature_cache_verify, tr.progress_every_s, arithmetic, tr.feature_cache_dtype
        )
        return cached_dataset(model, dataset, FEATURE_CACHE_DIR, settings)
    return dataset
