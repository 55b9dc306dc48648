"""One changed matrix at a time: read W_0 and W_t (or ΔW's factors), take the base factors (cached), find the
top-k tuned triplets in the base's singular bases, and turn them into a LayerResult.

See `intruders.py` for the method. The eigen-solvers live in `eigen.py`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NonFiniteError, ShapeMismatchError
from ..weights import LowRankUpdate, Weights
from ._runtime import Workspace, cpu_threads, trim_heap
from .eigen import top_eigenpairs, top_eigenpairs_gram
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
    """One changed matrix, float64 on the device: W_0 (m, n), its base factors, and W_t either as the update
    ΔW = L R (`update`, when the source knows its factors) or dense (`wt`)."""

    w0: torch.Tensor
    factors: BaseFactors
    update: LowRankUpdate | None = None
    wt: torch.Tensor | None = None


def analyse_all(names: list[str], base: Weights, tuned: Weights, k: int, threshold: float, side: str,
                device: torch.device, cache: FactorCache | None, done=None) -> tuple[list[LayerResult], list[str]]:
    """Analyse `names` in order -> (their LayerResults, the names whose W_t equals W_0).

    A pipeline of three threads, one matrix in each stage: one reads the next matrix (W_0, the update or W_t,
    the cached base factors, W_0 in float64), this one computes the products of the current one (the base
    decomposition when it is not cached, the low-rank eigenproblem), and one solves the eigenproblem of the
    previous one. Reading and products release the GIL, so on a CPU they run beside the solver's Python loop.
    done: called with 1 after each matrix.
    """
    pending, unchanged = [], []
    # buffers in two slots, one per matrix in flight; the base decompositions get all torch threads back
    work = Workspace(device, torch.get_num_threads())
    with (ThreadPoolExecutor(1, thread_name_prefix="intruder-read") as reader,
          ThreadPoolExecutor(1, thread_name_prefix="intruder-solve") as solver, cpu_threads(device)):
        ahead = reader.submit(fetch, names[0], base, tuned, cache, work, 0) if names else None
        for index, name in enumerate(names):
            fetched = ahead.result()
            if index + 1 < len(names):
                ahead = reader.submit(fetch, names[index + 1], base, tuned, cache, work, (index + 1) % 2)
            m = prepare(fetched, base, tuned, device, cache, work, index % 2)
            if m is None:
                unchanged.append(name)
            elif m.update is not None:  # the products here, the eigenproblem on the solver thread
                problem = low_rank_problem(m.w0, m.factors, m.update)
                slim = BaseFactors(problem.s[:0], problem.s, m.factors.left)  # the basis is not needed now
                pending.append(solver.submit(_low_rank_result, name, tuple(m.w0.shape), slim, m.update, problem,
                                             k, threshold, side))
            else:
                pending.append(analyse(name, m, k, threshold, side))
            del m, fetched
            trim_heap()
            if done is not None:
                done(1)
        results = [item if isinstance(item, LayerResult) else item.result() for item in pending]
    trim_heap()
    return results, unchanged


def _low_rank_result(name: str, shape: tuple, factors: BaseFactors, update: LowRankUpdate,
                     problem: LowRankProblem, k: int, threshold: float, side: str) -> LayerResult:
    """The LayerResult of a low-rank matrix from its eigenproblem (the solver thread's work)."""
    proj = problem.projection(*top_eigenpairs(problem.d, problem.pmat, problem.qmat, min(k, *shape)))
    delta_sigma = low_rank_singular_values(update.left, update.right)
    return _layer_result(name, shape, factors, proj, delta_sigma, "low-rank", threshold, side)


def analyse(name: str, m: Matrix, k: int, threshold: float, side: str) -> LayerResult:
    """One changed matrix, read: its LayerResult."""
    proj = project(m, k)
    if m.update is not None:
        delta_sigma, kind = low_rank_singular_values(m.update.left, m.update.right), "low-rank"
    else:  # W_0 - W_t: same singular values as ΔW
        delta_sigma, kind = singular_values(m.w0.sub_(m.wt)), "dense"
    return _layer_result(name, tuple(m.w0.shape), m.factors, proj, delta_sigma, kind, threshold, side)


@dataclass
class Fetched:
    """What `fetch` read for one matrix: W_0 as stored, its cache key and entry, and the tuned side."""

    name: str
    raw: torch.Tensor
    key: str | None
    factors: BaseFactors | None
    update: LowRankUpdate | None
    wt: torch.Tensor | None
    unchanged: bool = False
    w0: torch.Tensor | None = None  # W_0 in float64, converted here when nothing is to be decomposed first


def fetch(name: str, base: Weights, tuned: Weights, cache: FactorCache | None, work: Workspace,
          slot: int = 0) -> Fetched:
    """Read one matrix and its cached base factors (no decomposition); W_0 into `work`'s buffers of `slot`."""
    raw = work.read(base, name, slot)
    key = cache.key(raw, base.fingerprint(name)) if cache is not None else None
    update = tuned.low_rank_update(name)
    wt = None
    if update is None:  # compare first: an unchanged matrix costs no decomposition
        wt = tuned.get(name)
        _check_shape(name, tuple(raw.shape), tuple(wt.shape), tuned.source)
        if _equal(raw, wt):
            return Fetched(name, raw, key, None, None, None, unchanged=True)
    factors = cache.load(key, tuple(raw.shape)) if cache is not None else None
    w0 = work.f64(raw, 2 * slot) if factors is not None and work.device.type == "cpu" else None
    return Fetched(name, raw, key, factors, update, wt, w0=w0)


def prepare(f: Fetched, base: Weights, tuned: Weights, device: torch.device, cache: FactorCache | None,
            work: Workspace, slot: int = 0) -> Matrix | None:
    """The fetched matrix in float64 on `device`, its base factors computed (and cached) when they were not
    in the cache; None when W_t == W_0."""
    if f.unchanged:
        return None
    name, raw, factors = f.name, f.raw, f.factors
    if factors is None:  # a cache entry exists only for a finite W_0: none is written for any other
        work.release()  # room for the decomposition (buffers in use live on); reuse matters little here
        try:
            with cpu_threads(device, work.threads):  # all threads, torch's and the BLAS's
                factors = base_factors(raw.to(device))
        except NonFiniteError:
            raise _non_finite(raw, name, base.source) from None
        if cache is not None:
            cache.store(f.key, tuple(raw.shape), factors)
    w0 = f.w0 if f.w0 is not None else work.f64(raw, 2 * slot)
    factors = factors.to(device)
    if f.update is not None:
        update = f.update
        _check_shape(name, tuple(w0.shape), (update.left.shape[0], update.right.shape[1]), tuned.source)
        left, right = update.left.to(device, torch.float64), update.right.to(device, torch.float64)
        if not bool(torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise _non_finite(left @ right, name, tuned.source)
        return Matrix(w0, factors, update=LowRankUpdate(left, right))
    wt = work.f64(f.wt, 2 * slot + 1)
    if not bool(torch.isfinite(wt.sum())):
        raise _non_finite(wt, name, tuned.source)
    return Matrix(w0, factors, wt=wt)


def load(name: str, base: Weights, tuned: Weights, device: torch.device, cache: FactorCache | None,
         work: Workspace) -> Matrix | None:
    """Read W_0 and W_t (or ΔW's factors) of `name` and the base factors (cached); None when W_t == W_0."""
    return prepare(fetch(name, base, tuned, cache, work), base, tuned, device, cache, work)


def project(m: Matrix, k: int) -> Projection:
    """The top-k tuned triplets of one matrix in the base bases (k capped at min(m, n))."""
    k = min(k, min(m.w0.shape))
    if m.update is not None:
        problem = low_rank_problem(m.w0, m.factors, m.update)
        return problem.projection(*top_eigenpairs(problem.d, problem.pmat, problem.qmat, k))
    return _project_dense(m.w0, m.factors, m.wt, k)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of values, comparing in the wider dtype when the two are stored differently."""
    if a.dtype != b.dtype:
        wide = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(wide), b.to(wide)
    return torch.equal(a, b)


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


def low_rank_problem(w0: torch.Tensor, f: BaseFactors, update: LowRankUpdate) -> LowRankProblem:
    """W_t = W_0 + L R with L (m, r), R (r, n) -> its eigenproblem in the base basis, in O(m n r + p² r)."""
    if f.left:  # work on the small side: W (p, q), ΔW = L R with L (p, r), R (r, q)
        w, lo, ro = w0, update.left, update.right
    else:
        w, lo, ro = w0.T, update.right.T, update.left.T
    r = lo.shape[1]
    # P (p, 2r) = [Xᵀ L, Xᵀ W_0 Rᵀ] = [B, Cᵀ], as ([L, W_0 Rᵀ]ᵀ X)ᵀ: the order BLAS runs fastest (2-4x here)
    pmat = (torch.cat([lo.T, ro @ w.T], dim=0) @ f.basis).T.contiguous()
    eye = torch.eye(r, dtype=w.dtype, device=w.device)
    qmat = torch.cat([torch.cat([ro @ ro.T, eye], 1), torch.cat([eye, torch.zeros_like(eye)], 1)], 0)
    return LowRankProblem(f.sigma**2, pmat, qmat, f.sigma.clone())


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
