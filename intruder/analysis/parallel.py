"""Several processes, one analysis: inside a torch.distributed process group, `find_intruders` splits the
matrices among the ranks, balanced by their estimated cost, and gathers every rank's results into one report,
on every rank.

    torchrun --nproc_per_node 8 -m intruder analyze BASE TUNED --device cuda --out report.json

Each matrix is analysed by exactly one rank, with the single-process code (`analyse_all`), so the report holds
the same matrices in the same order with the same numbers: bit for bit where each rank runs with the thread
count of the single process (MKL's eigh rounds differently with another count, in the last digits), and the
same intruder counts always.

Cost of one matrix W (m, n), p = min(m, n), q = max(m, n), in the time of one multiply-add of a large matrix
product (the constants were measured on a CPU; docs/scaling.md measures the totals):
    warm, ΔW = L R of rank r:  (p q + p²)(READ + 2 r)     read W_0 and the cached basis; thin products
    warm, dense ΔW:            p² q + 2 p³ + p q (2 READ + 2 k ITERS)     ΔW's spectrum; Lanczos for the top k
    cold: warm + p² q + EIGH p³                            the base decomposition (Gram product, eigh)
With these a cold 4096 x 4096 matrix costs 55x its warm analysis (measured: 44x), a cold 4096 x 11008 one 35x
(measured: 34x; both on one CPU thread, docs/scaling.md), a cold 640 x 2048 one 6x (Gemma 3 270M: 10x).
The plan hands out matrices, most expensive first, each to the rank with the least cost so far (greedy
longest-processing-time): deterministic, and no rank's total exceeds another's by more than the largest cost.

Failures: a step that may fail on one rank only is settled by every rank (`distributed.together`, `agree`); when
one rank fails, every rank raises an IntruderError naming the failing rank and the tensor. A failing rank also posts a
notice in the process group's store, so that the others stop at their next matrix instead of finishing their
share first.
"""

from __future__ import annotations

import time
import uuid
from contextlib import nullcontext
from datetime import timedelta

import torch

from .. import distributed
from ..errors import IntruderError
from ..weights import Weights
from .projection import analyse_all
from .results import LayerResult
from .spectra import FactorCache

# measured on a CPU, one thread (docs/scaling.md): the Gram product ran at 2.8e-11 s per multiply-add, eigh at
# 3.0e-10 s per p³, the warm pass at 1.2e-8 s per element of W_0 and of the cached basis
READ = 400  # reading, converting and checksumming one element takes as long as this many multiply-adds
ITERS = 20  # Lanczos iterations of a dense update (typical)
EIGH = 10  # eigh of a p x p symmetric matrix, vectors included, takes as long as EIGH p³ multiply-adds
# how long a rank may wait for the others at one collective; they meet only around their shares
TIMEOUT = timedelta(hours=2)


def use_group(wanted: bool | None) -> bool:
    """Whether `find_intruders(distributed=wanted)` spreads its work: None uses a process group of several
    processes when one is initialised, False never does, True insists on one."""
    if wanted is False:
        return False
    if distributed.active():
        return True
    if wanted:
        raise IntruderError("distributed=True, but no torch.distributed process group of more than one process "
                            "is initialised: start the processes with torchrun and call "
                            "intruder.distributed.init_from_env() first, or leave distributed out")
    return False


def matrix_cost(shape: tuple[int, int], *, rank: int | None, cached: bool, k: int = 10) -> float:
    """Estimated multiply-adds to analyse one matrix of `shape` (out, in): with a low-rank update of `rank`
    (None: dense), and its base factors `cached` or not (see the module docstring)."""
    p, q = sorted(int(d) for d in shape)
    if rank is not None:
        cost = (p * q + p * p) * (READ + 2 * rank)
    else:
        cost = p * p * q + 2 * p**3 + p * q * (2 * READ + 2 * k * ITERS)
    if not cached:
        cost += p * p * q + EIGH * p**3
    return float(cost)


def plan(costs: list[float], ranks: int) -> list[list[int]]:
    """Split items of known `costs` among `ranks`: -> each rank's item indices, ascending.

    Greedy longest-processing-time: items by descending cost (ties by index), each to the rank with the least
    total so far (ties to the lowest rank). Deterministic; any two ranks' totals differ by at most max(costs).
    """
    if ranks < 1:
        raise ValueError(f"ranks={ranks}: need at least one rank")
    loads, shares = [0.0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        least = min(range(ranks), key=lambda r: (loads[r], r))
        shares[least].append(i)
        loads[least] += costs[i]
    return [sorted(share) for share in shares]


def estimate_costs(names: list[str], base: Weights, tuned: Weights, cache: FactorCache | None,
                   k: int) -> list[float]:
    """`matrix_cost` of each of `names`: the update's rank from the tuned source (an adapter knows it), cold
    unless the cache can tell without reading the tensor that its factors are there."""
    costs = []
    for name in names:
        update = tuned.low_rank_update(name)
        cached = cache is not None and cache.known(base.fingerprint(name))
        costs.append(matrix_cost(base.shape(name), rank=None if update is None else update.rank, cached=cached,
                                 k=k))
    return costs


def analyse_shared(names: list[str], base: Weights, tuned: Weights, k: int, threshold: float, side: str,
                   device: torch.device, cache: FactorCache | None, progress: bool,
                   workers: int | None = None) -> tuple[list[LayerResult], list[str], dict]:
    """`analyse_all` spread over the process group -> (every rank's LayerResults in the order of `names`, the
    names whose W_t equals W_0, meta: world size, devices, per-rank matrices, cost share and seconds).
    Collective: every rank calls it with the same names and gets the same answer."""
    start = time.perf_counter()
    with distributed.together("planning the split of the matrices"):
        costs = estimate_costs(names, base, tuned, cache, k) if distributed.rank() == 0 else None
    costs, run = distributed.broadcast_object((costs, uuid.uuid4().hex))
    shares = plan(costs, distributed.world_size())
    mine = shares[distributed.rank()]
    done, error = _analyse_share([names[i] for i in mine], base, tuned, k, threshold, side, device, cache,
                                 _Notice(run), progress, workers)
    distributed.agree(error, f"analysing its {len(mine)} of the {len(names)} matrices")
    seconds = time.perf_counter() - start
    gathered = distributed.all_gather_objects((list(zip(mine, done)), str(device), seconds))
    merged = sorted((pair for share, _, _ in gathered for pair in share), key=lambda pair: pair[0])
    total = sum(costs) or 1.0
    meta = {"seconds": round(max(s for _, _, s in gathered), 3), "world_size": len(gathered),
            "devices": [d for _, d, _ in gathered], "rank_matrices": [len(s) for s in shares],
            "rank_cost_share": [round(sum(costs[i] for i in s) / total, 4) for s in shares],
            "rank_seconds": [round(s, 3) for _, _, s in gathered]}
    return [r for _, r in merged if r is not None], [names[i] for i, r in merged if r is None], meta


def _analyse_share(share: list[str], base: Weights, tuned: Weights, k: int, threshold: float, side: str,
                   device: torch.device, cache: FactorCache | None, notice: _Notice, progress: bool,
                   workers: int | None) -> tuple[list[LayerResult | None], BaseException | None]:
    """This rank's matrices -> (one LayerResult or None (unchanged) per name of `share`, the error it met).
    Stops early, without an error of its own, when another rank posts a failure."""
    from tqdm.auto import tqdm

    finished = []
    bar = tqdm(total=len(share), desc=f"intruders (rank 0 of {distributed.world_size()})", unit="matrix",
               leave=False, disable=not (progress and distributed.rank() == 0))

    def step(n: int) -> None:
        finished.append(n)
        bar.update(n)
        if notice.posted():
            raise _Stopped

    try:
        results, skipped = analyse_all(share, base, tuned, k, threshold, side, device, cache, step, workers)
    except _Stopped:
        return [], None
    except Exception as exc:  # noqa: BLE001 - posted, then settled with every rank
        notice.post()
        name = getattr(exc, "tensor", None) or share[min(sum(finished), len(share) - 1)]
        return [], _named(exc, name, base.shape(name))
    finally:
        bar.close()
    found, unchanged = iter(results), set(skipped)
    return [None if name in unchanged else next(found) for name in share], None


class _Stopped(Exception):
    """Another rank failed: stop this rank's share (the failure is raised by `agree`)."""


class _Notice:
    """A flag in the process group's key-value store, set by a rank that fails and read by the others between
    matrices. Uses torch's default store (`_get_default_store`, private in torch); where it is missing, ranks
    learn of a failure only when they have finished their own share."""

    def __init__(self, run: str):
        self.key = f"intruder/analysis/{run}/failed"
        try:
            self.store = torch.distributed.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - an optional shortcut
            self.store = None

    def post(self) -> None:
        try:
            if self.store is not None:
                self.store.set(self.key, "1")
        except Exception:  # noqa: BLE001 - the failure is still settled at the end of the share
            pass

    def posted(self) -> bool:
        try:
            return self.store is not None and bool(self.store.check([self.key]))
        except Exception:  # noqa: BLE001
            return False


def _named(exc: BaseException, name: str, shape: tuple) -> BaseException:
    """`exc`, or an IntruderError naming the tensor when its message does not (an out-of-memory error)."""
    if name in str(exc):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    memory = isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in text.lower() \
        or "can't allocate memory" in text
    advice = ("; it needs more memory than the device has left: start fewer ranks per GPU or node, or use "
              "another device" if memory else "")
    return IntruderError(f"tensor {name!r} {list(shape)}: {text}{advice}")


def together_if(group: bool, what: str):
    """`distributed.together(what)` when the analysis is spread over a process group, else nothing."""
    return distributed.together(what) if group else nullcontext()
