"""intruder.distributed: two Gloo processes on the CPU, started as torchrun would (its environment variables)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from intruder import distributed
from intruder.errors import IntruderError, ShapeMismatchError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp_path, nprocs: int = 2) -> list:
    """Run `worker(rank)` in `nprocs` processes joined by init_from_env; each one's returned value, by rank."""
    port = _free_port()
    mp.spawn(_entry, args=(worker, nprocs, port, str(tmp_path)), nprocs=nprocs, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


def _entry(rank: int, worker, nprocs: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        result = worker(rank)
    finally:
        distributed.close()
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))


def _collectives(rank: int) -> dict:
    first = distributed.init_from_env()
    again = distributed.init_from_env()  # idempotent
    distributed.barrier()
    with distributed.alone():  # on its own: no collective, so rank 1 alone may enter
        alone = (distributed.active(), distributed.rank(), distributed.all_gather_objects(rank)) if rank else None
    try:
        distributed.device_for_rank("cuda")
        gpu = "no error"
    except IntruderError as exc:
        gpu = str(exc)
    return {"active": first and again and distributed.active(), "rank": distributed.rank(),
            "world": distributed.world_size(), "local": distributed.local_rank(),
            "gathered": distributed.all_gather_objects({"rank": rank, "x": [rank] * (rank + 1)}),
            "broadcast": distributed.broadcast_object(f"from {rank}", src=1),
            "sum": distributed.sum_across([rank + 0.5, 2]), "alone": alone,
            "device": (distributed.device_for_rank("cpu"), distributed.device_for_rank("auto"), gpu),
            "backend": torch.distributed.get_backend()}


def _failing(rank: int) -> list:
    distributed.init_from_env()
    caught = []
    for failing in ([1], [0, 1], []):
        error = ShapeMismatchError(f"tensor 'x' on rank {rank}") if rank in failing else None
        try:
            distributed.agree(error, "analysing")
            caught.append(None)
        except IntruderError as exc:
            caught.append((type(exc).__name__, str(exc)))
    try:
        with distributed.together("loading"):
            if rank == 0:
                raise ValueError("no such file")
    except IntruderError as exc:
        caught.append((type(exc).__name__, str(exc)))
    return caught


def test_collectives_across_two_gloo_processes(tmp_path):
    results = _spawn(_collectives, tmp_path)
    for rank, got in enumerate(results):
        assert got["active"] and got["rank"] == rank and got["world"] == 2 and got["local"] == rank
        assert got["gathered"] == [{"rank": 0, "x": [0]}, {"rank": 1, "x": [1, 1]}]
        assert got["broadcast"] == "from 1" and got["sum"] == [2.0, 4.0]
        assert got["alone"] == (None if rank == 0 else (False, 0, [1]))
        if not torch.cuda.is_available():
            assert got["device"] == ("cpu", "auto", "device 'cuda' but torch sees no GPU on this node; use "
                                                    "--device cpu")
        elif torch.cuda.device_count() >= 2:
            assert got["device"] == ("cpu", f"cuda:{rank}", "no error")
        assert got["backend"] == "gloo"


def test_a_failure_on_one_rank_raises_on_every_rank(tmp_path):
    results = _spawn(_failing, tmp_path)
    assert results[0] == results[1]  # the same error everywhere
    one, both, none, plain = results[0]
    assert one == ("ShapeMismatchError", "rank 1 failed while analysing: tensor 'x' on rank 1")
    assert both == ("ShapeMismatchError", "ranks 0, 1 failed while analysing: rank 0: tensor 'x' on rank 0; "
                                          "rank 1: tensor 'x' on rank 1")
    assert none is None
    assert plain == ("IntruderError", "rank 0 failed while loading: ValueError: no such file")


def test_a_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    assert (distributed.active(), distributed.rank(), distributed.world_size(), distributed.local_rank()) == (
        False, 0, 1, 0)
    assert distributed.all_gather_objects(3) == [3] and distributed.broadcast_object(4) == 4
    assert distributed.device_for_rank("cuda") == "cuda"
    distributed.barrier()
    distributed.agree(None, "nothing")
    with pytest.raises(ValueError, match="own"):  # a single process's error, unchanged
        distributed.agree(ValueError("own"), "nothing")


def test_a_half_set_environment_says_to_use_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(IntruderError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set; start the "
                                            "processes with torchrun"):
        distributed.init_from_env()
