"""Training on ``torchrun``: the process group, shares of work, and the global batch's embeddings.

``torchrun --nproc_per_node N -m fbnet train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment;
:func:`from_env` joins them into one process group: NCCL when training on CUDA (each process on
GPU ``LOCAL_RANK``), gloo on CPUs. A single process (no ``WORLD_SIZE``, or 1) gets ``None`` and
every helper here is then the identity, so one code path trains both ways.

The loss sees the global batch, as open_clip's ``gather_features(..., gather_with_grad=True)``
arranges it. Each process encodes its share of the batch's captions and their images; the image
units are all-gathered *with gradients* (``torch.distributed.nn``); each process scores every
image of the batch against its own captions (its columns of each similarity matrix) and those
columns are all-gathered with gradients too, so every process holds the whole ``(N, N)`` matrices
and computes the same loss (DSAW's mining therefore sees the whole batch). Backward through an
all-gather sums what every process sends back, i.e. ``world`` x this process's share of the
gradient; DistributedDataParallel's all-reduce then averages over processes, which gives exactly
the gradient of one process on the same global batch (tested against one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


@dataclass(frozen=True)
class Group:
    """This process's place in a torchrun group."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, writes checkpoints and reports."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks get one more)."""
        return share(n, self.rank, self.world)

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (pickled)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def share(n: int, rank: int, world: int) -> slice:
    bounds = np.cumsum([0] + [n // world + (r < n % world) for r in range(world)])
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def from_env(device: torch.device, timeout_s: float = 7200.0) -> Group | None:
    """Join the group torchrun described in the environment (``None`` for a single process).
    The timeout bounds how long a rank waits for another (rank 0 fine-tunes the detector and
    validates while the others wait)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def process_device(device: torch.device, group: Group | None) -> torch.device:
    """Each process trains on its own GPU (``cuda:LOCAL_RANK``); CPUs are shared."""
    if group is not None and device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    return device


def gather(t: torch.Tensor, group: Group | None) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, with gradients flowing back to
    each rank's own part. Ranks may differ in every dimension: the others are zero-padded to the
    largest (units and masks padded this way are masked out, so scores do not change)."""
    if group is None:
        return t
    shape = torch.tensor(t.shape, dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(group.world)]
    dist.all_gather(shapes, shape)
    big = torch.stack(shapes).max(dim=0).values.tolist()
    pad = [p for d in reversed(range(t.dim())) for p in (0, big[d] - t.shape[d])]
    parts = all_gather(F.pad(t, pad) if any(pad) else t.contiguous())
    return torch.cat([p[: int(s[0])] for p, s in zip(parts, shapes)])


def destroy(group: Group | None) -> None:
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()
