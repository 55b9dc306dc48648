"""One training run spread over the processes torchrun starts: DistributedDataParallel (DDP), each rank a share
of every micro-batch and of every evaluation, rank 0 the only one that writes.

    torchrun --nproc_per_node 4 -m intruder train --out runs/r8 --batch-size 8 --grad-accum 2

The global batch of one optimizer step is batch_size × ranks × grad_accum questions (8 × 4 × 2 = 64 above).
The ranks cut each epoch's order into micro-batches of batch_size × ranks questions exactly as one process with
that batch size would, and each rank takes its slice of every micro-batch (`Ranks.share`). Each rank weights its
slice's loss by the slice's share of the micro-batch, and DDP adds the ranks' gradients in the backward pass of a
step's last micro-batch; so the gradients, the logged losses and the weights are those of one process with
batch_size × ranks per micro-batch, to float round-off. Only dropout differs: each rank draws its own masks.

A `Ranks` of size 1 (a single process, or each run of a sweep) does no collective at all.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from .. import distributed
from ..errors import IntruderError
from .rundir import RunDirectory

# how long a rank may wait for the others at one collective: loading a model or writing a checkpoint can be slow
TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Ranks:
    """The processes one run is spread over: this one's `rank` of `size` (0 of 1: a single process)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def join(cls, data_parallel: bool | None, device: str) -> Ranks:
        """The ranks of a run: torchrun's processes (data_parallel None or True), or this process alone (False,
        or None without torchrun); with True and no torchrun, an IntruderError."""
        if data_parallel is False:
            return cls()
        distributed.init_from_env(device=device, timeout=TIMEOUT)
        if distributed.active():
            return cls(distributed.rank(), distributed.world_size())
        if data_parallel:
            raise IntruderError("data_parallel=True, but this process was not started by torchrun with several "
                                "processes; launch it with torchrun --nproc_per_node N, or train in one process")
        return cls()

    @property
    def main(self) -> bool:
        """Whether this rank writes: the run directory, metrics, checkpoints, progress."""
        return self.rank == 0

    def device(self, name: str) -> str:
        """The device name this rank trains on; refuses one GPU named for every rank."""
        if self.size > 1 and name.startswith("cuda:"):
            raise IntruderError(f"device={name!r} would put all {self.size} processes on one GPU; pass --device "
                                "cuda (or leave it auto) and each process takes cuda:LOCAL_RANK")
        return name

    def share(self, batch: list) -> list:
        """This rank's contiguous slice of a micro-batch of the whole group; slices differ by one at most."""
        base, extra = divmod(len(batch), self.size)
        start = self.rank * base + min(self.rank, extra)
        return batch[start:start + base + (self.rank < extra)]

    def stride(self, items: list) -> list:
        """Every size-th item from this rank's: its part of an evaluation set, with the same mix of lengths."""
        return items[self.rank::self.size]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        return distributed.sum_across(values) if self.size > 1 else [float(v) for v in values]

    def together(self, what: str):
        """A block that raises on every rank when it raised on any (`distributed.together`)."""
        return distributed.together(what) if self.size > 1 else nullcontext()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        return distributed.broadcast_object(obj) if self.size > 1 else obj

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        return distributed.all_gather_objects(obj) if self.size > 1 else [obj]

    def seed(self, seed: int) -> None:
        """Give each rank but 0 its own random stream (its dropout masks); rank 0 keeps a single process's."""
        if self.rank > 0:
            torch.manual_seed(seed + 1_000_003 * self.rank)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the training steps run: `model` in DDP across the ranks (which starts every rank from
        rank 0's weights), or `model` itself in a single process."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)  # buffers (rotary tables) never change

    def accumulating(self, net: torch.nn.Module, last: bool):
        """Around the forward and backward pass of a micro-batch: DDP's no_sync for all but a step's last, whose
        backward pass sums the gradients over the ranks."""
        return net.no_sync() if self.size > 1 and not last else nullcontext()

    def run_directory(self, out: Path, *, new: bool):
        """`RunDirectory(out)` on rank 0; on the others a stand-in that touches nothing."""
        return RunDirectory(out, new=new) if self.main else _Elsewhere()


class _Elsewhere:
    """The run directory as the ranks that do not write see it."""

    def __enter__(self) -> _Elsewhere:
        return self

    def keep(self) -> None:
        pass

    def __exit__(self, *exc) -> bool:
        return False
