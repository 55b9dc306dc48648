"""Every changed matrix: read W_0 and W_t (or ΔW's factors), take the base factors (cached), find the top-k
tuned triplets in the base's singular bases, and turn them into a LayerResult; on a CPU several matrices side
by side, with the small eigenproblems of low-rank updates solved in batches.

See `intruders.py` for the method. The eigen-solvers live in `eigen.py`.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NonFiniteError, ShapeMismatchError
from ..weights import LowRankUpdate, Weights
from ._runtime import Workspace, cpu_threads, trim_heap, worker_count
from .eigen import top_eigenpairs, top_eigenpairs_gram, top_eigenpairs_many
from .results import LayerResult
from .spectra import BaseFactors, FactorCache, base_factors, low_rank_singular_values, singular_values

SIMILARITY_WIDTH = 128  # base vectors kept in LayerResult.similarity (the paper's Figure 1)
_NULL_TOL = 1e-7  # base singular values below this fraction of the largest span the null space


@dataclass
class Projection:
    """Top-k tuned singular triplets written in the base's singular bases (small side / large side).

    sigma: (k,) tuned singular values. small: (k, p) coordinates of the tuned small-side vectors on the
    complete base basis X. large: (k, p) coordinates of the tuned large-side vectors on the base's
    large-side vectors W_0ᵀ x_i / s_i (0 where s_i is numerically zero).
    """

    sigma: torch.Tensor
    small: torch.Tensor
    large: torch.Tensor


@dataclass
class Matrix:
    """One changed matrix on the device: W_0 (m, n), its base factors, and W_t either as the update ΔW = L R
    (`update`, when the source knows its factors) or dense (`wt`). Everything is float64, except W_0 with an
    update on a CPU: as stored, and converted a block of rows at a time into `block` where it is used."""

    w0: torch.Tensor
    factors: BaseFactors
    update: LowRankUpdate | None = None
    wt: torch.Tensor | None = None
    block: torch.Tensor | None = None


def analyse_all(names: list[str], base: Weights, tuned: Weights, k: int, threshold: float, side: str,
                device: torch.device, cache: FactorCache | None, done=None,
                workers: int | None = None) -> tuple[list[LayerResult], list[str]]:
    """Analyse `names` -> (their LayerResults in order, the names whose W_t equals W_0).

    On a CPU, `workers` threads (default: one per torch thread, see `worker_count`) analyse matrices side by
    side, each with its own buffers and one BLAS thread (the work on one matrix is a chain of small products
    that a second thread would not speed up): each reads a matrix and reduces a low-rank one to its small
    eigenproblem (`reduce`), and, once SOLVE_BATCH of one size are waiting, solves those together
    (`eigen.top_eigenpairs_many`), so that the Python between the solver's LAPACK calls is paid once per
    batch. Reading, products and solves release the GIL. At most workers + 1 matrices are read ahead of this
    thread, which puts the results in order. The first failure in the order of `names` is raised, after the
    matrices in progress finish. done: called (from any of the threads) with the number of matrices finished.
    """
    count = worker_count(device, len(names), workers)
    share = torch.get_num_threads() if count == 1 else 1  # threads for a base decomposition (see load)
    local = threading.local()

    def one(name: str) -> LayerResult | Pending | None:
        work = getattr(local, "work", None)
        if work is None:
            work = local.work = Workspace(device, share)
        with _naming(name):
            m = load(name, base, tuned, device, cache, work)
            item = None if m is None else reduce(name, m, k, threshold, side)
            del m
        return item

    found: dict[int, LayerResult] = {}
    unchanged, waiting, solving = [], {}, []

    def solve(batch: list) -> None:  # on a worker when there are several, so that every core reads or solves
        with _naming(batch[0][1].name):
            solved = solve_pending([p for _, p in batch], threshold, side)
        found.update((index, result) for (index, _), result in zip(batch, solved))
        if done is not None:
            done(len(batch))

    with cpu_threads(device):
        pool = ThreadPoolExecutor(count, thread_name_prefix="intruder") if count > 1 else None
        items = map(one, names) if pool is None else _ahead(pool, one, names, count + 1)
        try:
            for index, (name, item) in enumerate(zip(names, items)):
                if isinstance(item, Pending):
                    batch = waiting.setdefault(item.size, [])
                    batch.append((index, item))
                    if len(batch) == SOLVE_BATCH:
                        ready = waiting.pop(item.size)
                        solving.append(pool.submit(solve, ready) if pool else solve(ready))
                    continue
                if item is None:
                    unchanged.append(name)
                else:
                    found[index] = item
                if done is not None:
                    done(1)
            for batch in waiting.values():
                solving.append(pool.submit(solve, batch) if pool else solve(batch))
            for job in solving:
                if pool is not None:
                    job.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    trim_heap()
    return [found[i] for i in sorted(found)], unchanged


@contextmanager
def _naming(name: str):
    """Mark an exception raised in the block with the tensor it was raised for (`exc.tensor`), for callers
    that report it: the matrices run out of order."""
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "tensor"):
            exc.tensor = name
        raise


def _ahead(pool: ThreadPoolExecutor, fn, args: list, window: int):
    """fn(a) for each a of args, in order, computed by `pool` at most `window` ahead of the caller (the
    matrices in flight are what the analysis holds in memory)."""
    queue = deque(pool.submit(fn, a) for a in args[:window])
    for a in args[window:]:
        head = queue.popleft()
        queue.append(pool.submit(fn, a))
        yield head.result()
    while queue:
        yield queue.popleft().result()


SOLVE_BATCH = 8  # low-rank eigenproblems of one size solved together (their temporaries grow with it)


@dataclass
class Pending:
    """A low-rank matrix reduced to its eigenproblem, waiting to be solved with others of its size."""

    name: str
    shape: tuple
    factors: BaseFactors  # sigma and the side only: the basis is not needed any more
    problem: LowRankProblem
    delta_sigma: torch.Tensor
    k: int

    @property
    def size(self) -> tuple:
        return (*self.problem.pmat.shape, self.k, self.problem.pmat.device)


def reduce(name: str, m: Matrix, k: int, threshold: float, side: str) -> LayerResult | Pending:
    """One changed matrix, read: its eigenproblem (a low-rank update on a CPU), else its LayerResult."""
    if m.update is None or m.w0.device.type != "cpu":
        return analyse(name, m, k, threshold, side)
    problem = low_rank_problem(m.w0, m.factors, m.update, m.block)
    return Pending(name, tuple(m.w0.shape), BaseFactors(problem.s[:0], problem.s, m.factors.left), problem,
                   low_rank_singular_values(m.update.left, m.update.right), min(k, *m.w0.shape))


def solve_pending(batch: list[Pending], threshold: float, side: str) -> list[LayerResult]:
    """LayerResults of low-rank matrices of one size, their eigenproblems solved together."""
    pairs = top_eigenpairs_many([(p.problem.d, p.problem.pmat, p.problem.qmat) for p in batch], batch[0].k)
    return [_layer_result(p.name, p.shape, p.factors, p.problem.projection(*pair), p.delta_sigma, "low-rank",
                          threshold, side) for p, pair in zip(batch, pairs)]


def analyse(name: str, m: Matrix, k: int, threshold: float, side: str) -> LayerResult:
    """One changed matrix, read: its LayerResult."""
    proj = project(m, k)
    if m.update is not None:
        delta_sigma, kind = low_rank_singular_values(m.update.left, m.update.right), "low-rank"
    else:  # W_0 - W_t: same singular values as ΔW
        delta_sigma, kind = singular_values(m.w0.sub_(m.wt)), "dense"
    return _layer_result(name, tuple(m.w0.shape), m.factors, proj, delta_sigma, kind, threshold, side)


def load(name: str, base: Weights, tuned: Weights, device: torch.device, cache: FactorCache | None,
         work: Workspace) -> Matrix | None:
    """Read W_0 and W_t (or ΔW's factors) of `name` into `work`'s buffers, in float64 on `device`, with the base
    factors (from the cache, or computed and cached); None when W_t == W_0."""
    raw = work.read(base, name)
    key = cache.key(raw, base.fingerprint(name)) if cache is not None else None
    update = tuned.low_rank_update(name)
    wt = None
    if update is None:  # compare first: an unchanged matrix costs no decomposition
        wt = tuned.get(name)
        _check_shape(name, tuple(raw.shape), tuple(wt.shape), tuned.source)
        if _equal(raw, wt):
            return None
    factors = cache.load(key, tuple(raw.shape), work.entry_buffer) if cache is not None else None
    if factors is None:  # a cache entry exists only for a finite W_0: none is written for any other
        try:  # all threads when this is the only worker; with several, each decomposes on one thread
            with cpu_threads(device, work.threads) if work.threads > 1 else nullcontext():
                factors = base_factors(raw.to(device))
        except NonFiniteError:
            raise _non_finite(raw, name, base.source) from None
        if cache is not None:
            cache.store(key, tuple(raw.shape), factors)
        trim_heap()  # the decomposition's workspace: tens of MB per worker on a large matrix
    factors = factors.to(device)
    if update is not None:
        _check_shape(name, tuple(raw.shape), (update.left.shape[0], update.right.shape[1]), tuned.source)
        left, right = update.left.to(device, torch.float64), update.right.to(device, torch.float64)
        if not _finite(left, right):
            raise _non_finite(left @ right, name, tuned.source)
        if device.type == "cpu":
            block = work.f64(raw[: max(1, BLOCK_BYTES // (8 * raw.shape[1]))], 2)
            return Matrix(raw, factors, update=LowRankUpdate(left, right), block=block)
        return Matrix(work.f64(raw, 0), factors, update=LowRankUpdate(left, right))
    w0 = work.f64(raw, 0)
    wt = work.f64(wt, 1)
    if not bool(torch.isfinite(wt.sum())):
        raise _non_finite(wt, name, tuned.source)
    return Matrix(w0, factors, wt=wt)


def project(m: Matrix, k: int) -> Projection:
    """The top-k tuned triplets of one matrix in the base bases (k capped at min(m, n))."""
    k = min(k, min(m.w0.shape))
    if m.update is not None:
        problem = low_rank_problem(m.w0, m.factors, m.update, m.block)
        return problem.projection(*top_eigenpairs(problem.d, problem.pmat, problem.qmat, k))
    return _project_dense(m.w0, m.factors, m.wt, k)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of values, comparing in the wider dtype when the two are stored differently."""
    if a.dtype != b.dtype:
        wide = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(wide), b.to(wide)
    return torch.equal(a, b)


def _finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry is finite. A finite sum means finite entries (an Inf or NaN entry makes the sum Inf
    or NaN); only a sum that is not (an overflow) has the entries checked one by one."""
    return all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()) for t in tensors)


def _non_finite(w: torch.Tensor, name: str, source: str) -> NonFiniteError:
    bad = int((~torch.isfinite(w)).sum())
    return NonFiniteError(f"tensor {name!r} in {source} holds {bad} NaN/Inf values; "
                          "the checkpoint is damaged or training diverged: use an earlier checkpoint")


def _check_shape(name: str, base_shape: tuple, tuned_shape: tuple, source: str) -> None:
    if base_shape != tuned_shape:
        raise ShapeMismatchError(
            f"tensor {name!r} has shape {base_shape} in the base but {tuned_shape} in {source}; "
            "the two models have different architectures: pass the base this model was fine-tuned from")


@dataclass
class LowRankProblem:
    """Xᵀ W_t W_tᵀ X = diag(d) + P Q Pᵀ for W_t = W_0 + L R on the small side (p, q), in the base basis X.

    d (p,) = S², P (p, 2r) = [B, Cᵀ] with B = Xᵀ L and C = R W_0ᵀ X = R Y S, Q (2r, 2r) = [[R Rᵀ, I], [I, 0]].
    """

    d: torch.Tensor
    pmat: torch.Tensor
    qmat: torch.Tensor
    s: torch.Tensor

    def projection(self, lam: torch.Tensor, z: torch.Tensor) -> Projection:
        """Projection from the top-k eigenpairs lam (k,), z (p, k) of diag(d) + P Q Pᵀ."""
        r = self.pmat.shape[1] // 2
        b, ct = self.pmat[:, :r], self.pmat[:, r:]
        sigma = lam.clamp_min(0).sqrt()
        # the other side: Yᵀ v_j = (S z_j + S⁻¹ Cᵀ Bᵀ z_j) / σ_j
        large = self.s[:, None] * z + (ct @ (b.T @ z)) / safe(self.s)[:, None]
        return Projection(sigma, z.T, _null_zeroed(large / safe(sigma)[None, :], self.s).T)


def low_rank_problem(w0: torch.Tensor, f: BaseFactors, update: LowRankUpdate,
                     block: torch.Tensor | None = None) -> LowRankProblem:
    """W_t = W_0 + L R with L (m, r), R (r, n) -> its eigenproblem in the base basis, in O(m n r + p² r).

    W_0 may be stored in any float dtype when `block` (float64, a whole number of W_0's rows) is given: it is
    converted a block at a time, which stays in the CPU's cache for the product (20 % faster on two cores).
    """
    if f.left:  # work on the small side: W (p, q), ΔW = L R with L (p, r), R (r, q)
        lo, ro = update.left, update.right
    else:
        lo, ro = update.right.T, update.left.T
    r = lo.shape[1]
    # P (p, 2r) = [Xᵀ L, Xᵀ W_0 Rᵀ] = [B, Cᵀ], as ([L, W_0 Rᵀ]ᵀ X)ᵀ: the order BLAS runs fastest (2-4x here)
    pmat = (torch.cat([lo.T, _times_base(ro, w0, f.left, block)], dim=0) @ f.basis).T.contiguous()
    eye = torch.eye(r, dtype=ro.dtype, device=ro.device)
    qmat = torch.cat([torch.cat([ro @ ro.T, eye], 1), torch.cat([eye, torch.zeros_like(eye)], 1)], 0)
    return LowRankProblem(f.sigma**2, pmat, qmat, f.sigma.clone())


BLOCK_BYTES = 1 << 20  # float64 rows of W_0 converted at a time: the block stays in a core's L2/L3 cache


def _times_base(ro: torch.Tensor, w0: torch.Tensor, left: bool, block: torch.Tensor | None) -> torch.Tensor:
    """ro (r, q) @ Wᵀ (q, p) for W = W_0 (left) or W_0ᵀ, float64, with W_0 converted into `block`."""
    if block is None:
        w0 = w0.to(torch.float64)
        return ro @ (w0.T if left else w0)
    rows, cols = w0.shape
    step = block.shape[0]
    ron = ro.numpy()
    out = np.empty((rows, ro.shape[0])) if left else np.zeros((ro.shape[0], cols))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = block[: stop - start].copy_(w0[start:stop]).numpy()
        if left:  # rows of W Rᵀ, written in place (17 % faster than columns of R Wᵀ)
            np.matmul(part, ron.T, out=out[start:stop])
        else:
            out += ron[:, start:stop] @ part
    out = out.T if left else out
    return torch.from_numpy(out)


def _project_dense(w0: torch.Tensor, f: BaseFactors, wt: torch.Tensor, k: int) -> Projection:
    """Dense W_t: its top-k small-side vectors (Lanczos on W_t W_tᵀ), projected on the base bases."""
    w, t = (w0, wt) if f.left else (w0.T, wt.T)  # (p, q)
    lam, y = top_eigenpairs_gram(t, k)  # y (p, k)
    sigma = lam.clamp_min(0).sqrt()
    v = (t.T @ y) / safe(sigma)[None, :]  # (q, k) tuned large-side vectors
    large = (f.basis.T @ (w @ v)) / safe(f.sigma)[:, None]
    return Projection(sigma, (f.basis.T @ y).T, _null_zeroed(large, f.sigma).T)


def safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def _null_zeroed(coords: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Zero the rows of base directions whose singular value is numerically zero (they are arbitrary)."""
    keep = s > _NULL_TOL * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return coords * keep[:, None]


def _layer_result(name: str, shape: tuple, f: BaseFactors, proj: Projection, delta_sigma: torch.Tensor,
                  kind: str, threshold: float, side: str) -> LayerResult:
    left, right = (proj.small, proj.large) if f.left else (proj.large, proj.small)
    left, right = left.abs().cpu().numpy(), right.abs().cpu().numpy()
    shown = right if side == "right" else left
    delta = delta_sigma.cpu().numpy()
    return LayerResult(
        name=name, shape=shape, threshold=threshold, side=side, update=kind,
        singular_values=proj.sigma.cpu().numpy().copy(),
        max_cos_left=left.max(axis=1), max_cos_right=right.max(axis=1),
        best_match_left=left.argmax(axis=1), best_match_right=right.argmax(axis=1),
        similarity=shown[:, :SIMILARITY_WIDTH].astype(np.float32),
        base_singular_values=f.sigma.cpu().numpy().copy(),  # not a view into the cache entry's buffer
        delta_singular_values=np.sort(delta[delta > _NULL_TOL * delta.max(initial=0)])[::-1].copy(),
    )
