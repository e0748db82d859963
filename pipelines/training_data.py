"""The one training path: the dataset a model of the configured setting trains on.

Used by the train stage and by the sweep objective, so a sweep tunes exactly what ``train`` trains:
normal images (+ the fixed pseudo-anomaly bank or on-the-fly synthesis when residual learning is
on), wrapped per setting (few-shot augmentation, semi-supervised pasting of real anomalies) or,
for the plain settings, served from the encoder-feature cache when ``train.feature_cache``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from components.data.cache import ImageCache
from components.data.datasets import ImageDataset, Record
from components.data.fewshot import FewShotDataset, select_shots
from components.data.semi import SemiSupervisedDataset
from components.feature_cache import CacheSettings, cached_dataset
from pipelines.builders import build_synthesizer, build_transform, residual_mode
from pipelines.config import Params
from pipelines.paths import FEATURE_CACHE_DIR, IMAGE_CACHE_DIR
from pipelines.records import pseudo_anomaly_bank, semi_supervised_anomalies

__all__ = ["training_dataset"]


def training_dataset(
    p: Params, group_records: list[Record], all_records: list[Record], model: Any, device: str, progress: bool
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
        settings = CacheSettings(device, progress, p.train.feature_cache_verify)
        return cached_dataset(model, dataset, FEATURE_CACHE_DIR, settings)
    return dataset
