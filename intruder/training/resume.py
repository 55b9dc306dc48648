"""What `train(..., resume=True)` reads: the run's settings (`config.json`) and `state.pt`, replaced after every
epoch, beside its checkpoints.

It holds the epoch and optimizer step reached, the optimizer and schedule, the length of metrics.jsonl then, and
the random streams: those of the process (`rng`, `python_rng`, `cuda_rng`) and, for a run spread over several
ranks, every rank's (`ranks`, in rank order), so that a resumed run draws what the uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .. import distributed
from ..errors import IntruderError
from ..weights import open_weights
from .lora import load_adapter_state


def saved_config(out: Path) -> dict:
    """The settings a run was started with (`out/config.json`), or an IntruderError saying what is wrong."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise IntruderError(f"{path} does not exist, so the settings {out} was started with are unknown: put its "
                            "config.json back to resume it, or start the run afresh with --overwrite")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise IntruderError(f"{path} cannot be read ({exc}): restore it to resume the run, or start it afresh "
                            "with --overwrite") from exc
    if not isinstance(values, dict):
        raise IntruderError(f"{path} holds a JSON {type(values).__name__}, not the run's settings: restore it to "
                            "resume the run, or start it afresh with --overwrite")
    return values


def saved_settings(out: Path) -> dict:
    """`saved_config(out)` as rank 0 reads it, on every rank (under torchrun the others need not see `out`);
    {} when there is no config.json (`train` then says what is missing)."""
    with distributed.together(f"reading {Path(out) / 'config.json'}"):
        saved = saved_config(out) if distributed.rank() == 0 and (Path(out) / "config.json").is_file() else {}
    return distributed.broadcast_object(saved)


def random_state(device: torch.device) -> dict:
    """This process's random streams: torch's CPU one, Python's, and the GPU's it trains on (None off CUDA)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"rng": torch.get_rng_state(), "python_rng": random.getstate(), "cuda_rng": cuda}


def save_state(out: Path, epoch: int, step: int, optimizer, schedule, metrics: Path, streams: list[dict]) -> None:
    """Write `out/state.pt` beside its place and rename it in; `streams`: `random_state()` of every rank."""
    state = {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             **streams[0], "ranks": streams if len(streams) > 1 else None, "metrics_bytes": metrics.stat().st_size}
    tmp = out / f".state.pt.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, out / "state.pt")


def load_state(out: Path) -> dict:
    try:
        return torch.load(out / "state.pt", weights_only=True, map_location="cpu")  # tensors and plain values
    except Exception as exc:  # a state file we wrote ourselves; anything else is damage
        raise IntruderError(f"{out / 'state.pt'} cannot be read ({exc}); start the run afresh with --overwrite"
                            ) from exc


def restore(state: dict, model, config, out: Path, optimizer, schedule, *, rank: int, device: torch.device):
    """Put the run back where its last finished epoch left it; (next epoch index, step).

    Rank 0 reads the checkpoint into `model` and cuts metrics.jsonl back to its length then (what the interrupted
    epoch logged goes); the other ranks get the weights from rank 0 when DDP wraps the model."""
    if rank == 0:
        _load_checkpoint(model, config, out / f"epoch-{state['epoch']:02d}")
        with (out / "metrics.jsonl").open("r+b") as f:
            f.truncate(state["metrics_bytes"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    streams = state["ranks"][rank] if state.get("ranks") else state
    torch.set_rng_state(streams["rng"])
    random.setstate(streams["python_rng"])
    cuda = streams["cuda_rng"]
    if isinstance(cuda, list) and torch.cuda.is_available():  # saved by an earlier version: every GPU's
        torch.cuda.set_rng_state_all(cuda)
    elif cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    return state["epoch"], state["step"]


def _load_checkpoint(model, config, checkpoint: Path) -> None:
    if config.method == "lora":
        load_adapter_state(model, checkpoint)
        return
    with open_weights(checkpoint) as saved, torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(saved.get(name))
