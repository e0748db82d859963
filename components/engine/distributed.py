"""Data-parallel training across processes (torchrun): one rank per device, the global batch split.

Launch: ``torchrun --nproc-per-node N -m pipelines.cli train`` (or ``inpformer train --nproc N``);
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) describes the
process group, NCCL on CUDA and gloo on CPU.

Equivalence with one process: every rank draws the same global batch of ``batch_size`` images (the
epoch sampler is seeded by (seed, epoch), not by rank) and takes its contiguous share; DDP averages
the gradients. The losses with a batch-wide statistic are made global: soft mining's mean distance
(spec §8) is averaged over all ranks' positions, and the Dice loss averages over all ranks'
anomalous images. So N ranks × B/N images give the gradients, losses and weights of 1 × B up to
float summation order.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "GlobalBatchNorm2d",
    "check_same_config",
    "convert_batchnorm",
    "global_count",
    "global_mean",
    "global_sum",
    "init_from_env",
    "rank_mean",
    "world_size",
    "wrap_ddp",
]

ENV_WORLD = "WORLD_SIZE"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group (``world == 1``: no group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, models and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op alone)."""
        if self.active:
            dist.barrier()

    def share(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` (``n`` divisible by ``world``)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def init_from_env(device: str) -> DistContext:
    """Join the process group described by torchrun's environment (NCCL for CUDA, else gloo)."""
    world = int(os.environ.get(ENV_WORLD, "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (no gradient) over all its elements on all ranks (equal sizes per rank);
    exactly ``x.mean()`` in one process."""
    m = x.mean()
    if _world() > 1:
        m = m.detach().clone()
        dist.all_reduce(m)
        m = m / _world()
    return m


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return _world()


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks (no gradient, no host sync); ``x`` alone."""
    if _world() > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
    return x


def global_count(mask: torch.Tensor) -> tuple[int, int]:
    """(number of True in ``mask`` on all ranks, number of ranks)."""
    n = mask.sum()
    if _world() > 1:
        n = n.detach().clone()
        dist.all_reduce(n)
    return int(n), _world()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's share of the batch (CPU / gloo,
    where :class:`torch.nn.SyncBatchNorm` does not run). The sums travel through an autograd-aware
    all-reduce, so gradients flow through the global statistics as in one process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        x64 = x.double()
        local = torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), x64.new_tensor([x[:, 0].numel()])])
        total = all_reduce(local)
        c = self.num_features
        n = total[-1]
        mean, sq = total[:c] / n, total[c : 2 * c] / n
        var = sq - mean * mean
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
                self.num_batches_tracked.add_(1)
        shape = (1, c, 1, 1)
        y = (x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def wrap_ddp(module: nn.Module, device: torch.device, local_rank: int) -> nn.Module:
    """``module`` in DistributedDataParallel (gradients averaged over the ranks; no buffer syncs)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [local_rank] if device.type == "cuda" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers: still the flag that skips syncs
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def rank_mean(ctx: DistContext, values: dict[str, torch.Tensor]) -> list[float]:
    """Loss values averaged over the ranks (each rank's are means of its share); alone: the values.
    Float32 values stay float32 before the mean (as logged before), float64 sums stay float64."""
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values.values()) else torch.float32
    stacked = torch.stack([v.detach().to(dtype) for v in values.values()])
    if ctx.active:
        dist.all_reduce(stacked)
        stacked = stacked / ctx.world
    return stacked.tolist()


def convert_batchnorm(model: nn.Module, cuda: bool) -> nn.Module:
    """Replace the BatchNorm2d layers of ``model`` in place by global-statistics ones (SyncBatchNorm on
    CUDA, :class:`GlobalBatchNorm2d` elsewhere); parameters and running statistics are kept."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                new = GlobalBatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new.to(next(child.parameters(), child.running_mean).device))
    return model


def check_same_config(ctx: DistContext, text: str) -> None:
    """Raise on every rank when the ranks were started with different params (``text``: a canonical dump)."""
    if not ctx.active:
        return
    digest = hashlib.sha256(text.encode()).hexdigest()
    gathered: list[str] = [""] * ctx.world
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) > 1:
        ranks = [r for r, d in enumerate(gathered) if d != gathered[0]]
        msg = f"ranks {ranks} were started with other params than rank 0: start every rank with the same params."
        raise ValueError(msg)
