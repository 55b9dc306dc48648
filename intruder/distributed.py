"""Several processes, one job: the few collective steps `intruder` needs from `torch.distributed`.

    torchrun --nproc_per_node 4 -m intruder train ...     # one process per GPU (NCCL), or per CPU share (Gloo)

torchrun starts the processes and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_from_env`
joins them into one process group. Everything below also works in a plain single process, where it is a no-op
(`rank() == 0`, `world_size() == 1`, `all_gather_objects(x) == [x]`), so callers need no second code path.

A rank that fails must not leave the others waiting at their next collective forever: code that may fail on one
rank only (reading a file, loading a model) reports its outcome through `agree(error, what)`, which every rank
calls and which raises the same error on every rank when any of them failed.

Inside `with alone():` a process acts on its own although torchrun started others (each run of a sweep trains
in one process): `active()` is False there, so code that spreads its work when `active()` keeps it whole.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import IntruderError

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_alone = 0  # how many `alone()` blocks this process is in


def launched() -> bool:
    """Whether this process was started by torchrun (or srun/mpirun setting the same variables) with WORLD_SIZE > 1;
    true before `init_from_env` has run."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise IntruderError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number; start the processes "
                            "with torchrun, which sets it") from None


def init_from_env(backend: str | None = None, *, device: str | torch.device | None = None,
                  timeout: timedelta | None = None) -> bool:
    """Join the process group torchrun's environment describes, once; whether a group of more than one process
    is active. Idempotent (a second call changes nothing); a process not started by torchrun stays single.

    backend: by default "cpu:gloo,cuda:nccl" when CUDA is available and `device` is not the CPU (nor MPS):
        NCCL for GPU tensors, Gloo for CPU tensors and the object collectives below; else "gloo". Any backend
        string `torch.distributed.init_process_group` takes overrides it. Where NCCL is used and there is a
        GPU per local rank, each process takes cuda:LOCAL_RANK as its current device.
    timeout: how long a collective waits for the slowest rank before failing (torch's default: 10 minutes
        with NCCL, 30 with Gloo); raise it where ranks do unequal work between collectives.
    """
    if dist.is_available() and dist.is_initialized():
        return active()
    if not launched():
        return False
    if not dist.is_available():
        raise IntruderError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for several processes, but this torch "
                            f"({torch.__version__}) was built without torch.distributed; run one process")
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise IntruderError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; start the "
                            "processes with torchrun (torchrun --nproc_per_node N -m intruder ...)")
    kind = torch.device(device).type if device not in (None, "auto") else None
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and kind not in ("cpu", "mps") else "gloo"
    if "nccl" in backend and int(os.environ["LOCAL_RANK"]) < torch.cuda.device_count():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timeout)
    return active()


def active() -> bool:
    """Whether a process group of more than one process is active (and this process not in an `alone()` block)."""
    return _alone == 0 and _grouped()


@contextmanager
def alone():
    """Within the block this process works on its own: `active()` is False, `rank()` 0, every collective a
    no-op; `device_for_rank` still gives it its own GPU. Every rank may enter it at its own time, or not at all."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def rank() -> int:
    """This process's rank, 0..world_size()-1; 0 when not distributed."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes take part; 1 when not distributed."""
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's rank on its own machine (torchrun's LOCAL_RANK): the GPU it uses; 0 when not distributed."""
    return int(os.environ.get("LOCAL_RANK", rank())) if active() else 0


def device_for_rank(device: str | torch.device) -> str | torch.device:
    """The device this process should use for `device`: "cuda" (and "auto" where CUDA is available) become
    cuda:LOCAL_RANK among several processes (also within `alone()`); anything else, and everything in a single
    process, is returned as given."""
    if not _grouped():
        return device
    own = device.type == "cuda" and device.index is None if isinstance(device, torch.device) else (
        device == "cuda" or (device == "auto" and torch.cuda.is_available()))
    if not own:
        return device
    index, count = int(os.environ.get("LOCAL_RANK", dist.get_rank())), torch.cuda.device_count()
    if count == 0:
        raise IntruderError(f"device {str(device)!r} but torch sees no GPU on this node; use --device cpu")
    if index >= count:
        raise IntruderError(f"process LOCAL_RANK={index} has no GPU of its own: torch sees {count} on this node; "
                            f"start at most {count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", index) if isinstance(device, torch.device) else f"cuda:{index}"


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process."""
    if not active():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (the others' `obj` is ignored); `obj` itself in a single process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sum_across(values: list[float]) -> list[float]:
    """Each of `values` summed over the ranks (in float64), on every rank; `values` in a single process."""
    if not active():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def barrier() -> None:
    """Wait until every rank has come here; nothing in a single process."""
    if active():
        dist.barrier()


def agree(error: BaseException | None, what: str) -> None:
    """Collective: each rank passes the exception it met while doing `what`, or None; if any rank failed, every
    rank raises, so none waits forever at a later collective. The error names the failing rank(s) and their
    messages ("rank 1 failed while training: ..."); its class is the first failure's when that is an
    IntruderError subclass, else IntruderError. The same error on every rank, and a single process's own
    error, are raised unchanged."""
    if not active():
        if error is not None:
            raise error
        return
    outcome = None if error is None else (type(error), f"{type(error).__name__}: {error}"
                                          if not isinstance(error, IntruderError) else str(error))
    outcomes = all_gather_objects(_picklable(outcome))
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if error is not None and len(failed) == len(outcomes) and len({o[1] for _, o in failed}) == 1:
        raise error  # the same error on every rank (bad options, a file every rank reads): as it is
    ranks = ", ".join(str(r) for r, _ in failed)
    if len(failed) == 1:
        message = f"rank {ranks} failed while {what}: {failed[0][1][1]}"
    else:
        message = f"ranks {ranks} failed while {what}: " + "; ".join(f"rank {r}: {o[1]}" for r, o in failed)
    raise _error(failed[0][1][0], message) from error


@contextmanager
def together(what: str):
    """`agree` around a block: `with together("loading the model"): ...` raises on every rank when the block
    raised an Exception on any rank. Every rank must enter the block."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised
        agree(exc, what)
    else:
        agree(None, what)


def close() -> None:
    """Leave the process group, if one is initialised (at the end of a command, so NCCL shuts down cleanly)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _grouped() -> bool:
    """Whether this process belongs to a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _picklable(outcome):
    """(error class, message) with the class replaced by None when it cannot travel by pickle."""
    if outcome is None:
        return None
    cls, message = outcome
    return (cls if issubclass(cls, IntruderError) and cls.__module__.startswith("intruder") else None, message)


def _error(cls, message: str) -> IntruderError:
    if cls is not None:
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - an error class wanting other arguments: the base class will do
            pass
    return IntruderError(message)
