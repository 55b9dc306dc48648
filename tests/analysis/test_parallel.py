"""find_intruders over several processes (CPU, Gloo): the plan, the gathered report, failures, the shared cache.

Reports are compared with a single process run with the same thread count (1): MKL's eigh rounds differently
with another count, in the last digits, and the comparison here is byte for byte.
"""

import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from intruder import IntruderError, find_intruders
from intruder.analysis import cachelock
from intruder.analysis.parallel import matrix_cost, plan
from intruder.analysis.spectra import FactorCache, base_factors, tensor_digest
from intruder.errors import NonFiniteError
from intruder.synthetic import random_adapter, random_base
from intruder.weights import StateDictWeights

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SHAPES_7B = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base (2 layers x 7 projections), a random r=4 adapter, and the same adapter with a NaN in one B."""
    root = tmp_path_factory.mktemp("models")
    base = random_base(root / "base", n_layers=2, hidden=48, intermediate=96)
    adapter = random_adapter(base, root / "adapter", rank=4, alpha=8)
    bad = random_adapter(base, root / "bad", rank=4, alpha=8)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    return base, adapter, bad


# -- the plan ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2, 3, 8, 40])
def test_the_plan_balances_cost_within_the_largest_item(ranks):
    costs = [matrix_cost(s, rank=8, cached=False) for s in SHAPES_7B * 4]
    costs += [matrix_cost(s, rank=None, cached=True) for s in SHAPES_7B[:3]] + [1.0, 0.0]
    shares = plan(costs, ranks)
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))  # each item exactly once
    assert all(share == sorted(share) for share in shares) and len(shares) == ranks
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)
    assert plan(costs, ranks) == shares  # deterministic


def test_the_plan_weighs_cost_not_count():
    # one cold 11008 x 4096 decomposition against eight warm 4096 x 4096 matrices
    costs = [matrix_cost((11008, 4096), rank=8, cached=False)] + [matrix_cost((4096, 4096), rank=8, cached=True)] * 8
    assert plan(costs, 2) == [[0], list(range(1, 9))]
    assert matrix_cost((4096, 4096), rank=8, cached=False) > 10 * matrix_cost((4096, 4096), rank=8, cached=True)
    assert matrix_cost((4096, 11008), rank=8, cached=True) == matrix_cost((11008, 4096), rank=8, cached=True)
    with pytest.raises(ValueError, match="at least one rank"):
        plan(costs, 0)


def test_layer_results_travel_by_pickle(models):
    base, adapter, _ = models
    report = find_intruders(base, adapter, cache_dir=False, progress=False)
    back = pickle.loads(pickle.dumps(report.layers))
    assert [lr.to_dict() for lr in back] == [lr.to_dict() for lr in report.layers]


def test_distributed_true_needs_a_process_group(models):
    base, adapter, _ = models
    with pytest.raises(IntruderError, match="distributed=True, but no torch.distributed process group"):
        find_intruders(base, adapter, distributed=True, progress=False)


# -- torchrun, the command line ---------------------------------------------------------------------------


def _intruder(args, *, ranks: int, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, "-m", "intruder", "analyze", *map(str, args), "--quiet"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_torchrun_writes_what_one_process_writes(models, tmp_path):
    base, adapter, _ = models
    two = _intruder([base, adapter, "--out", tmp_path / "two.json", "--cache-dir", tmp_path / "c2"], ranks=2,
                    cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    with _threads(1):  # what `intruder analyze` writes in one process of one thread
        one = find_intruders(str(base), str(adapter), cache_dir=tmp_path / "c1", progress=False)
    assert two.stdout.count("total: ") == 1  # rank 0 alone prints
    assert two.stdout.splitlines()[:-1] == one.summary().splitlines()  # the same table, then "wrote ..."
    first, second = json.loads(one.to_json()), json.loads((tmp_path / "two.json").read_text())
    meta = second.pop("meta")
    first.pop("meta")
    assert json.dumps(first) == json.dumps(second)  # every number, every name, in the same order
    assert meta["world_size"] == 2 and meta["rank_matrices"] == [7, 7] and meta["devices"] == ["cpu", "cpu"]
    assert len(list((tmp_path / "c2" / "factors").rglob("*.safetensors"))) == 14
    assert not list((tmp_path / "c2").rglob("*.lock"))


def test_a_failing_rank_stops_every_rank_naming_the_tensor_and_the_rank(models, tmp_path):
    base, _, bad = models
    started = time.perf_counter()
    done = _intruder([base, bad, "--out", tmp_path / "r.json", "--cache-dir", tmp_path / "c"], ranks=2,
                     cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    # both ranks print the same message (their lines may interleave on the shared stderr)
    errors = [part.split("\n")[0].strip() for part in done.stderr.split("intruder: error: ")[1:]]
    assert len(errors) == 2 and errors[0] == errors[1], done.stderr
    assert re.search(r"rank [01] failed while analysing its 7 of the 14 matrices: tensor "
                     r"'model\.layers\.1\.mlp\.up_proj\.weight' in .* holds \d+ NaN/Inf values", errors[0])
    assert not (tmp_path / "r.json").exists()
    assert time.perf_counter() - started < 120


# -- the Python entry, in processes joined by init_method=file:// -----------------------------------------


def _spawn(worker, tmp_path, *args) -> list:
    mp.spawn(_entry, args=(worker, str(tmp_path), args), nprocs=2, join=True)
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def _entry(rank: int, worker, tmp: str, args) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        result = worker(rank, *args)
    finally:
        torch.distributed.destroy_process_group()
    Path(tmp, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def _analyse_in_group(rank: int, base, adapter, cache) -> dict:
    report = find_intruders(base, adapter, cache_dir=cache, progress=False)
    alone = find_intruders(base, adapter, cache_dir=False, progress=False, distributed=False) if rank == 1 else None
    return {"report": json.loads(report.to_json()), "alone": alone and json.loads(alone.to_json())}


class SlowTuned(StateDictWeights):
    """A tuned model that takes 0.3 s to read each odd-numbered layer, and counts what it reads."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.read = 0

    def get(self, name):
        self.read += 1
        if int(name.split(".")[1]) % 2:
            time.sleep(0.3)
        return super().get(name)


def _analyse_bad(rank: int, base, tuned) -> tuple[str, int]:
    tuned = SlowTuned(tuned)
    try:
        find_intruders(base, tuned, cache_dir=False, progress=False)
    except NonFiniteError as exc:
        return f"NonFiniteError: {exc}", tuned.read
    return "no error", tuned.read


def test_find_intruders_in_a_process_group_gives_every_rank_the_whole_report(models, tmp_path):
    base, adapter, _ = models
    got = _spawn(_analyse_in_group, tmp_path, str(base), str(adapter), str(tmp_path / "cache"))
    with _threads(1):
        single = json.loads(find_intruders(base, adapter, cache_dir=False, progress=False).to_json())
    meta = single.pop("meta")
    metas = [result["report"].pop("meta") for result in got]
    assert metas[0] == metas[1] and metas[0]["world_size"] == 2  # the same report on every rank, meta included
    assert got[0]["report"] == got[1]["report"] == single
    alone = got[1]["alone"]  # distributed=False on one rank: no collective (rank 0 never calls it), no split
    assert "world_size" not in alone.pop("meta") and "world_size" not in meta
    assert alone == single


def test_a_failing_rank_in_python_raises_on_both_naming_rank_and_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(30, 40, generator=g, dtype=torch.float64) for i in range(8)}
    tuned = {k: v + 0.1 for k, v in base.items()}
    tuned["layer.0.weight"][3, 3] = float("inf")  # equal costs: rank 0 takes layers 0, 2, 4, 6, rank 1 the rest
    (error0, _), (error1, read1) = _spawn(_analyse_bad, tmp_path, base, tuned)
    assert error0 == error1
    assert re.fullmatch(r"NonFiniteError: rank 0 failed while analysing its 4 of the 8 matrices: tensor "
                        r"'layer\.0\.weight' in <state dict> holds 1 NaN/Inf values; .*", error0)
    assert read1 < 4  # rank 1 heard of the failure and stopped before the end of its share


# -- the factor cache shared by processes ---------------------------------------------------------------------


def _matrices() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(120, 90 + 10 * i, generator=g, dtype=torch.float64) for i in range(6)]


def _fill(rank: int, directory: str, barrier, queue) -> None:
    """Ask for every entry of `_matrices`, computing slowly (0.2 s each): both processes start with entry 0, so
    one waits for the other's, then they go through the rest from opposite ends."""
    torch.set_num_threads(1)
    warnings.simplefilter("error")
    cache, computed, matrices = FactorCache(directory), [], _matrices()
    order = [0, 1, 2, 3, 4, 5] if rank == 0 else [0, 5, 4, 3, 2, 1]
    barrier.wait(timeout=60)
    for i in order:
        w = matrices[i]
        key = cache.key(w)
        found = cache.load(key, tuple(w.shape))
        if found is None:
            computed.append(i)
            time.sleep(0.2)
            found = cache.store(key, tuple(w.shape), base_factors(w))
        queue.put((rank, i, found.sigma.numpy(), found.basis.numpy()))
    queue.put((rank, "computed", computed))


def test_processes_sharing_a_cache_compute_each_entry_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_fill, args=(r, str(tmp_path), barrier, queue)) for r in range(2)]
    for p in procs:
        p.start()
    messages = [queue.get(timeout=120) for _ in range(2 * 7)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    computed = [m[2] for m in messages if m[1] == "computed"]
    assert sorted(computed[0] + computed[1]) == list(range(6))  # each entry once, by one of them
    assert computed[0] and computed[1]  # and they took turns rather than one doing everything
    with _threads(1):
        fresh = [base_factors(w) for w in _matrices()]
    for _, i, sigma, basis in (m for m in messages if m[1] != "computed"):
        assert np.array_equal(sigma, fresh[i].sigma.numpy()) and np.array_equal(basis, fresh[i].basis.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact: read without a warning
        for w, f in zip(_matrices(), fresh):
            assert torch.equal(FactorCache(tmp_path).load(tensor_digest(w), tuple(w.shape)).basis, f.basis)
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp"))


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lock_of(cache: FactorCache, w: torch.Tensor) -> Path:
    return cache._path(tensor_digest(w)).with_suffix(".lock")


def test_a_lock_left_by_a_dead_process_is_broken_at_once(tmp_path):
    cache, w = FactorCache(tmp_path), torch.randn(20, 30, dtype=torch.float64)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = _lock_of(cache, w)
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{cachelock._HOST} {dead.stdout.strip()}\n")
    started = time.perf_counter()
    assert cache.load(tensor_digest(w), tuple(w.shape)) is None  # ours to compute now
    assert time.perf_counter() - started < 5 and cachelock.holds(lock)
    cache.store(tensor_digest(w), tuple(w.shape), base_factors(w))
    assert not lock.exists()


def test_a_silent_lock_of_another_host_is_broken_after_stale_after(tmp_path):
    cache, w = FactorCache(tmp_path, stale_after=0.5), torch.randn(20, 30, dtype=torch.float64)
    lock = _lock_of(cache, w)
    lock.parent.mkdir(parents=True)
    lock.write_text("another-host 12345\n")
    started = time.perf_counter()
    assert cache.load(tensor_digest(w), tuple(w.shape)) is None
    assert 0.5 <= time.perf_counter() - started < 10
    cache.release()
    assert not lock.exists()


def test_a_held_lock_is_waited_for_and_its_entry_read(tmp_path):
    w = torch.randn(20, 30, dtype=torch.float64)
    key, shape = tensor_digest(w), tuple(w.shape)
    holder = FactorCache(tmp_path)
    taken = threading.Event()

    def compute_slowly():
        assert holder.load(key, shape) is None
        taken.set()
        time.sleep(0.5)
        holder.store(key, shape, base_factors(w))

    thread = threading.Thread(target=compute_slowly)
    thread.start()
    taken.wait(10)
    started = time.perf_counter()
    found = FactorCache(tmp_path, stale_after=60).load(key, shape)  # waits rather than computing it again
    thread.join()
    assert found is not None and time.perf_counter() - started > 0.3
    assert torch.equal(found.basis, base_factors(w).basis)


# -- GPU ------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
def test_find_intruders_on_cuda_equals_the_cpu(models):
    base, adapter, _ = models
    cpu = find_intruders(base, adapter, cache_dir=False, progress=False)
    gpu = find_intruders(base, adapter, cache_dir=False, progress=False, device="cuda")
    assert [lr.name for lr in gpu.layers] == [lr.name for lr in cpu.layers]
    assert [lr.n_intruders for lr in gpu.layers] == [lr.n_intruders for lr in cpu.layers]
    for a, b in zip(gpu.layers, cpu.layers):
        np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-10)
        np.testing.assert_allclose(a.max_cos_left, b.max_cos_left, atol=1e-8)
        np.testing.assert_allclose(a.base_singular_values, b.base_singular_values, rtol=1e-9, atol=1e-12)


@pytest.mark.cuda
@needs_cuda
def test_lora_training_in_bf16_autocast_on_cuda_runs(tiny_lm, tmp_path):
    from intruder.training.trainer import TrainConfig, train

    config = TrainConfig(out=str(tmp_path / "run"), model=str(tiny_lm), epochs=1, batch_size=8, lr=5e-3, rank=4,
                         alpha=8, context=False, max_length=192, device="cuda", bf16=True, forget_texts=2)
    summary = train(config, progress=False)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s["kind"] == "train"]
    assert summary["checkpoints"] == ["epoch-01"] and losses and all(np.isfinite(losses))
