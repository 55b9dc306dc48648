"""Intruder dimensions (Shuttleworth et al., arXiv 2410.21228, Algorithm 1), computed exactly and fast.

For W_t = W_0 + ΔW (m, n), tuned left singular vector y_j (j < k) is an intruder when
max_i |cos(y_j, x_i)| < ε over all left singular vectors x_i of W_0. Rather than two full SVDs, the method
here works in the complete singular basis X of W_0's small side (p = min(m, n)), cached on disk:

* low-rank ΔW = L R (LoRA): Xᵀ W_t W_tᵀ X = S² + P Q Pᵀ, a diagonal plus a rank-2r matrix, whose top-k
  eigenvectors z_j are the tuned vectors written in the base basis, so max_i |cos| = max_i |z_j[i]|;
* dense ΔW (full fine-tuning): top-k eigenvectors of W_t W_tᵀ only, then projected on X.
The other side's cosines follow from the same eigenvectors at O(k) extra matrix-vector products.
`tuned_triplets` returns the same top-k triplets (σ_j, u_j, v_j) themselves, for the mitigation.
"""

from __future__ import annotations

import numbers
import platform
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import IntruderError, NoCommonTensorsError, NonFiniteError, ShapeMismatchError
from ..weights import LowRankUpdate, Weights, open_weights
from ._runtime import Workspace, cpu_threads, torch_threads, trim_heap
from .results import SIDES, IntruderReport, LayerResult
from .spectra import (
    BaseFactors,
    FactorCache,
    base_factors,
    low_rank_singular_values,
    singular_values,
)

SIMILARITY_WIDTH = 128  # base vectors kept in LayerResult.similarity (the paper's Figure 1)
_DENSE_EIGH_LIMIT = 128  # up to this small-side size a dense eigh beats Lanczos (at 256 it did not, on Gemma)
_NULL_TOL = 1e-7  # base singular values below this fraction of the largest span the null space


@dataclass
class _Projection:
    """Top-k tuned singular triplets written in the base's singular bases (small side / large side).

    sigma: (k,) tuned singular values. small: (k, p) coordinates of the tuned small-side vectors on the
    complete base basis X. large: (k, p) coordinates of the tuned large-side vectors on the base's
    large-side vectors W_0ᵀ x_i / s_i (0 where s_i is numerically zero).
    """

    sigma: torch.Tensor
    small: torch.Tensor
    large: torch.Tensor


@dataclass
class _Matrix:
    """One changed matrix, float64 on the device: W_0 (m, n), its base factors, and W_t either as the update
    ΔW = L R (`update`, when the source knows its factors) or dense (`wt`)."""

    w0: torch.Tensor
    factors: BaseFactors
    update: LowRankUpdate | None = None
    wt: torch.Tensor | None = None


def find_intruders(base, tuned, *, threshold: float = 0.5, top_k: int = 10, side: str = "left",
                   layers=None, device=None, cache_dir=None, progress: bool = True) -> IntruderReport:
    """Find the intruder dimensions of every matrix that fine-tuning changed.

    base: the pretrained model; tuned: the fine-tuned one, or a PEFT LoRA adapter directory. Each may be
        anything `open_weights` accepts (directory, file, hub id, state dict, nn.Module, `Weights`).
    threshold: ε; a tuned vector whose largest |cos| with every base vector is below ε is an intruder.
    top_k: k, how many of the tuned matrix's top singular vectors are examined.
    side: "left" (the paper's definition), "right", or "both" (an intruder on either side).
    layers: None for every 2-D tensor present in both and changed, a regex, or a list of tensor names.
    device: where the linear algebra runs ("cpu" default, "cuda" when available).
    cache_dir: where base factors are cached (default `~/.cache/intruder`); False disables the cache.
    """
    check_options(threshold, top_k, side)
    device = check_device(device)
    base_w = open_weights(base)
    tuned_w = open_weights(tuned, base=base_w)
    cache = None if cache_dir is False else FactorCache(cache_dir)
    names, unchanged = _select(base_w, tuned_w, layers)
    start = time.perf_counter()
    # small products run single-threaded (see cpu_threads); base decompositions get all torch threads back
    results, work = [], Workspace(device, torch.get_num_threads())
    with cpu_threads(device):
        for name in _progress(names, progress):
            result = _analyse(name, base_w, tuned_w, top_k, threshold, side, device, cache, work)
            if result is None:
                unchanged.append(name)
            else:
                results.append(result)
            trim_heap()
    if not results:
        raise NoCommonTensorsError(
            f"no analysed matrix differs between {base_w.source} and {tuned_w.source}: "
            f"the {len(names)} selected 2-D tensors are identical; check that `tuned` is the fine-tuned model"
        )
    meta = {"seconds": round(time.perf_counter() - start, 3), "device": str(device), "torch": torch.__version__,
            "python": platform.python_version(), "cache": None if cache is None else str(cache.directory)}
    return IntruderReport(results, threshold, top_k, side, base=base_w.source, tuned=tuned_w.source,
                          unchanged=unchanged, meta=meta)


def check_options(threshold: float, top_k: int, side: str) -> None:
    """Raise IntruderError unless ε, k and the side are ones `find_intruders` accepts."""
    if not isinstance(side, str) or side not in SIDES:
        raise IntruderError(f"side={side!r}: use one of {', '.join(SIDES)}")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise IntruderError(f"threshold={threshold!r} is a {type(threshold).__name__}: give a number in (0, 1], "
                            "e.g. threshold=0.5")
    if not 0 < threshold <= 1:  # NaN fails this too
        raise IntruderError(f"threshold={threshold}: a cosine threshold must lie in (0, 1], e.g. 0.5")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
        raise IntruderError(f"top_k={top_k!r}: give a positive whole number of tuned singular vectors, e.g. 10")


def check_device(device) -> torch.device:
    """The torch device the analysis runs on: None or "cpu" (the CPU), "cuda" or "cuda:N" when torch sees that
    GPU; anything else raises IntruderError."""
    try:
        found = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError) as exc:
        raise IntruderError(f"device={device!r} is not a torch device ({exc}); use 'cpu' (the default) or "
                            "'cuda'") from None
    if found.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise IntruderError(f"device={device!r} but this torch ({torch.__version__}) sees no CUDA GPU; "
                                "leave the device out (or use 'cpu'), or install a CUDA build of torch")
        if found.index is not None and found.index >= count:
            raise IntruderError(f"device={device!r} but torch sees {count} CUDA GPU(s), cuda:0 to "
                                f"cuda:{count - 1}; choose one of those")
    elif found.type != "cpu":
        raise IntruderError(f"device={device!r}: the analysis runs in float64 on 'cpu' or 'cuda' only; use one "
                            "of those")
    return found


def _select(base: Weights, tuned: Weights, layers) -> tuple[list[str], list[str]]:
    """Names to analyse, in the base's order, and the common 2-D names the tuned source reports unchanged."""
    tuned_keys = set(tuned.keys())
    common = [n for n in base.keys() if n in tuned_keys and len(base.shape(n)) == 2]
    if not common:
        raise NoCommonTensorsError(
            f"{base.source} and {tuned.source} have no 2-D tensor in common (base has e.g. "
            f"{', '.join(base.keys()[:3])}; tuned has e.g. {', '.join(sorted(tuned_keys)[:3])}); "
            "pass the base model this one was fine-tuned from"
        )
    if isinstance(layers, str):
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise IntruderError(f"layers={layers!r} is not a valid regular expression ({exc}); escape special "
                                r"characters with a backslash, e.g. 'layers\.0\.' or 'up_proj'") from None
        selected = [n for n in common if pattern.search(n)]
        if not selected:
            raise NoCommonTensorsError(
                f"layers={layers!r} matches none of the {len(common)} common matrices (e.g. {common[0]})")
        common = selected
    elif layers is not None:
        wanted = list(layers)
        missing = [n for n in wanted if n not in set(common)]
        if missing:
            raise NoCommonTensorsError(
                f"layers: {', '.join(missing[:3])} not among the common 2-D tensors (e.g. {', '.join(common[:3])})")
        common = wanted
    changed = tuned.changed_keys()
    if changed is None:
        return common, []
    return [n for n in common if n in changed], [n for n in common if n not in changed]


def _progress(names: list[str], enabled: bool):
    if not enabled:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc="intruders", unit="matrix", leave=False)


def _analyse(name: str, base: Weights, tuned: Weights, k: int, threshold: float, side: str,
             device: torch.device, cache: FactorCache | None, work: Workspace) -> LayerResult | None:
    """One matrix: None when W_t == W_0, else its LayerResult."""
    m = _load(name, base, tuned, device, cache, work)
    if m is None:
        return None
    proj = _project(m, k)
    if m.update is not None:
        delta_sigma, kind = low_rank_singular_values(m.update.left, m.update.right), "low-rank"
    else:  # W_0 - W_t: same singular values as ΔW
        delta_sigma, kind = singular_values(m.w0.sub_(m.wt)), "dense"
    return _layer_result(name, tuple(m.w0.shape), m.factors, proj, delta_sigma, kind, threshold, side)


def tuned_triplets(base: Weights, tuned: Weights, name: str, k: int, *, device=None,
                   cache: FactorCache | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The top-k singular triplets of W_t = tuned[name] (m, n), computed as `find_intruders` computes them
    (same projections, same cached base factors, same threads), so index j here is its tuned vector j.

    -> σ (k,) descending, U (m, k) left and V (n, k) right singular vectors, float64 on `device`, with
    W_t v_j = σ_j u_j; None when W_t equals W_0. k is capped at min(m, n). The small side's vectors y_j come
    from the projection, the other side's as W_tᵀ y_j / σ_j (or W_t y_j / σ_j), so σ_j u_j v_jᵀ is exactly
    u_j u_jᵀ W_t (W_t v_j v_jᵀ) and no second decomposition is needed.
    """
    device = torch.device(device or "cpu")
    work = Workspace(device, torch.get_num_threads())
    with cpu_threads(device):
        m = _load(name, base, tuned, device, cache, work)
        if m is None:
            return None
        proj = _project(m, k)
        y = m.factors.basis @ proj.small.T  # (p, k) tuned small-side vectors
        if m.update is not None:  # W_tᵀ Y = W_0ᵀ Y + Rᵀ (Lᵀ Y), on the small side's orientation
            lo, ro = (m.update.left, m.update.right) if m.factors.left else (m.update.right.T, m.update.left.T)
            w = m.w0 if m.factors.left else m.w0.T
            wty = w.T @ y + ro.T @ (lo.T @ y)
        else:
            wty = (m.wt.T if m.factors.left else m.wt) @ y
        z = wty / _safe(proj.sigma)[None, :]  # (q, k) tuned large-side vectors
    return (proj.sigma, y, z) if m.factors.left else (proj.sigma, z, y)


def _load(name: str, base: Weights, tuned: Weights, device: torch.device, cache: FactorCache | None,
          work: Workspace) -> _Matrix | None:
    """Read W_0 and W_t (or ΔW's factors) of `name` and the base factors (cached); None when W_t == W_0."""
    raw = work.read(base, name)
    key = cache.key(raw, base.fingerprint(name)) if cache is not None else None
    update = tuned.low_rank_update(name)
    if update is None:  # compare first: an unchanged matrix costs no decomposition
        wt = tuned.get(name)
        _check_shape(name, tuple(raw.shape), tuple(wt.shape), tuned.source)
        if _equal(raw, wt):
            return None
    factors = cache.load(key, tuple(raw.shape)) if cache is not None else None
    if factors is None:  # a cache entry exists only for a finite W_0: none is written for any other
        work.release()  # room for the decomposition; reusing buffers matters little in a cold run
        try:
            with torch_threads(work.threads):
                factors = base_factors(raw.to(device))
        except NonFiniteError:
            raise _non_finite(raw, name, base.source) from None
        if cache is not None:
            cache.store(key, tuple(raw.shape), factors)
    w0 = work.f64(raw, 0)
    del raw
    factors = factors.to(device)
    if update is not None:
        _check_shape(name, tuple(w0.shape), (update.left.shape[0], update.right.shape[1]), tuned.source)
        left, right = update.left.to(device, torch.float64), update.right.to(device, torch.float64)
        if not bool(torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise _non_finite(left @ right, name, tuned.source)
        return _Matrix(w0, factors, update=LowRankUpdate(left, right))
    wt = work.f64(wt, 1)
    if not bool(torch.isfinite(wt.sum())):
        raise _non_finite(wt, name, tuned.source)
    return _Matrix(w0, factors, wt=wt)


def _project(m: _Matrix, k: int) -> _Projection:
    """The top-k tuned triplets of one matrix in the base bases (k capped at min(m, n))."""
    k = min(k, min(m.w0.shape))
    if m.update is not None:
        return _project_low_rank(m.w0, m.factors, m.update, k)
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


def _project_low_rank(w0: torch.Tensor, f: BaseFactors, update: LowRankUpdate, k: int) -> _Projection:
    """W_t = W_0 + L R with L (m, r), R (r, n): top-k tuned triplets in O(m n r) given the base factors."""
    if f.left:  # work on the small side: W (p, q), ΔW = L R with L (p, r), R (r, q)
        w, lo, ro = w0, update.left, update.right
    else:
        w, lo, ro = w0.T, update.right.T, update.left.T
    x, s = f.basis, f.sigma
    b = x.T @ lo  # (p, r): L in the base basis
    c = (ro @ w.T) @ x  # (r, p): R W_0ᵀ X = R Y S
    r = lo.shape[1]
    eye = torch.eye(r, dtype=w.dtype, device=w.device)
    pmat = torch.cat([b, c.T], dim=1)  # (p, 2r)
    qmat = torch.cat([torch.cat([ro @ ro.T, eye], 1), torch.cat([eye, torch.zeros_like(eye)], 1)], 0)
    # Xᵀ W_t W_tᵀ X = S² + B C + Cᵀ Bᵀ + B (R Rᵀ) Bᵀ = S² + P Q Pᵀ
    lam, z = _top_eigenpairs(s**2, pmat, qmat, k)
    sigma = lam.clamp_min(0).sqrt()
    # the other side: Yᵀ v_j = (S z_j + S⁻¹ Cᵀ Bᵀ z_j) / σ_j
    large = s[:, None] * z + (c.T @ (b.T @ z)) / _safe(s)[:, None]
    return _Projection(sigma, z.T, _null_zeroed(large / _safe(sigma)[None, :], s).T)


def _project_dense(w0: torch.Tensor, f: BaseFactors, wt: torch.Tensor, k: int) -> _Projection:
    """Dense W_t: its top-k small-side vectors (Lanczos on W_t W_tᵀ), projected on the base bases."""
    w, t = (w0, wt) if f.left else (w0.T, wt.T)  # (p, q)
    lam, y = _top_eigenpairs_gram(t, k)  # y (p, k)
    sigma = lam.clamp_min(0).sqrt()
    v = (t.T @ y) / _safe(sigma)[None, :]  # (q, k) tuned large-side vectors
    large = (f.basis.T @ (w @ v)) / _safe(f.sigma)[:, None]
    return _Projection(sigma, (f.basis.T @ y).T, _null_zeroed(large, f.sigma).T)


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def _null_zeroed(coords: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Zero the rows of base directions whose singular value is numerically zero (they are arbitrary)."""
    keep = s > _NULL_TOL * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return coords * keep[:, None]


def _top_eigenpairs(d: torch.Tensor, pmat: torch.Tensor, qmat: torch.Tensor, k: int):
    """Top-k eigenpairs of diag(d) + P Q Pᵀ (p, p): values (k,) descending, vectors (p, k)."""
    if _dense(d, k):
        return _dense_top(torch.diag(d) + pmat @ qmat @ pmat.T, k)
    dn, pn, qn = d.numpy(), pmat.numpy(), qmat.numpy()
    pt = np.ascontiguousarray(pn.T)
    return _lanczos_top(lambda v: dn[:, None] * v + pn @ (qn @ (pt @ v)), d.shape[0], k)


def _top_eigenpairs_gram(t: torch.Tensor, k: int):
    """Top-k eigenpairs of T Tᵀ for T (p, q) without forming it when p is large."""
    if _dense(t, k):
        return _dense_top(t @ t.T, k)
    tn = t.numpy()
    return _lanczos_top(lambda v: tn @ (tn.T @ v), t.shape[0], k)


def _dense(x: torch.Tensor, k: int) -> bool:
    """Whether a dense eigh of the (p, p) problem beats Lanczos: small p, k close to p, or a GPU."""
    return x.shape[0] <= max(_DENSE_EIGH_LIMIT, 2 * k) or x.device.type != "cpu"


def _dense_top(m: torch.Tensor, k: int):
    values, vectors = torch.linalg.eigh(m)
    return values.flip(0)[:k], vectors.flip(1)[:, :k].contiguous()


def _lanczos_top(matmat, p: int, k: int):
    """Implicitly restarted Lanczos (ARPACK) to machine precision, from a fixed start vector."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = LinearOperator((p, p), matvec=lambda v: matmat(v.reshape(p, -1)).ravel(),
                        matmat=matmat, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(p)
    values, vectors = eigsh(op, k=k, which="LA", v0=v0, ncv=min(p, max(2 * k + 1, 24)), tol=0)
    order = np.argsort(values)[::-1]
    return torch.from_numpy(values[order].copy()), torch.from_numpy(vectors[:, order].copy())


def _layer_result(name: str, shape: tuple, f: BaseFactors, proj: _Projection, delta_sigma: torch.Tensor,
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
