"""Epoch-seeded batch sampling for the training engine (resumable, DDP-aware, persistent workers).

Each epoch's order is a permutation seeded by (seed, epoch), so a resumed run draws exactly the
batches an uninterrupted one would; under DDP every rank draws the same global batches and takes
its share. Items carry the dataset's epoch tag, so loader workers that persist across epochs set
their own copy's epoch (:class:`EpochIndexed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from components.engine.distributed import DistContext
from components.engine.train_config import TrainConfig

__all__ = ["SAMPLER_SEED_STRIDE", "EpochIndexed", "EpochSampler"]

SAMPLER_SEED_STRIDE = 100_003  # the sampler's generator seed = seed · stride + epoch


class EpochSampler(Sampler[list[tuple[int, int]]]):
    """Batches of one epoch from a (seed, epoch)-seeded permutation, starting at batch ``skip``;
    under DDP each rank takes its contiguous share of every global batch (the distributed sampler).

    Items are ``(tag, index)``: :class:`EpochIndexed` tells the dataset copy that reads them (in the
    main process or a persistent loader worker) the epoch ``tag`` itself. Reused across epochs by
    :meth:`set_epoch`, so one loader (and its workers) lives for the whole phase.
    """

    def __init__(self, n: int, cfg: TrainConfig, ctx: DistContext | None = None) -> None:
        self.n, self.cfg, self.ctx = n, cfg, ctx
        self.batches: list[list[tuple[int, int]]] = []

    def set_epoch(self, epoch: int, skip: int, tag: int) -> None:
        """The batches of ``epoch`` from batch ``skip``; items tagged ``tag`` (the dataset's epoch)."""
        cfg, ctx = self.cfg, self.ctx
        g = torch.Generator().manual_seed(cfg.seed * SAMPLER_SEED_STRIDE + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        stop = (self.n // cfg.batch_size) * cfg.batch_size if cfg.drop_last else self.n
        batches = [order[i : i + cfg.batch_size] for i in range(0, stop, cfg.batch_size)][skip:]
        batches = [b[ctx.share(len(b))] for b in batches] if ctx is not None and ctx.active else batches
        self.batches = [[(tag, i) for i in b] for b in batches]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EpochIndexed(Dataset):
    """A dataset read by ``(epoch tag, index)``: calls ``set_epoch`` on its own copy when the tag
    changes, so loader workers that persist across epochs draw each epoch's pseudo anomalies."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.tag = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        tag, index = key
        if tag != self.tag and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(tag)
        self.tag = tag
        return self.dataset[index]
