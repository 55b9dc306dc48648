"""Top-k eigenpairs of the symmetric positive semi-definite operators the analysis meets.

Two operators, both (p, p), never formed when p is large:
* diag(d) + P Q Pᵀ, d (p,), P (p, w), Q (w, w): the tuned Gram matrix of a low-rank update in the base basis;
* T Tᵀ for T (p, q): the Gram matrix of a dense tuned matrix.

`top_eigenpairs` solves a whole batch of the first kind at once with a Lanczos process that runs on every
problem of the batch in the same tensor operations (full reorthogonalisation, so its Ritz pairs are as
accurate as a dense `eigh`'s). Each pair it returns has its true residual checked, ‖A z − θ z‖ ≤ 1e-12 ‖A‖;
a problem that has not converged within `p` steps goes to ARPACK, which is what every problem used before:
same answers, but the per-iteration Python of 126 separate ARPACK loops (4 ms a matrix) becomes one loop.
"""

from __future__ import annotations

import numpy as np
import torch

DENSE_LIMIT = 128  # up to this size a dense eigh beats Lanczos (at 256 it did not, on Gemma)
_CHECK_EVERY = 16  # Lanczos steps between convergence checks
_TOLERANCE = 1e-12  # accepted residual ‖A z − θ z‖, relative to the largest eigenvalue


def top_eigenpairs(d: torch.Tensor, pmat: torch.Tensor, qmat: torch.Tensor, k: int):
    """Top-k eigenpairs of B problems diag(d_b) + P_b Q_b P_bᵀ at once.

    d (B, p), pmat (B, p, w), qmat (B, w, w), float64 on one device -> values (B, k) descending and
    vectors (B, p, k) with orthonormal columns.
    """
    batch, p = d.shape

    def apply(v: torch.Tensor) -> torch.Tensor:  # (B, p, c) -> (B, p, c)
        return d[:, :, None] * v + pmat @ (qmat @ (pmat.mT @ v))

    if dense(p, k, d.device):
        full = torch.diag_embed(d) + pmat @ qmat @ pmat.mT
        values, vectors = torch.linalg.eigh(full)
        return values.flip(-1)[:, :k], vectors.flip(-1)[:, :, :k].contiguous()
    values, vectors, ok = _lanczos(apply, batch, p, k, d.dtype, d.device)
    for b in torch.nonzero(~ok).flatten().tolist():  # rare: not converged in p steps
        values[b], vectors[b] = _arpack_low_rank(d[b], pmat[b], qmat[b], k)
    return values, vectors


def _arpack_low_rank(d: torch.Tensor, pmat: torch.Tensor, qmat: torch.Tensor, k: int):
    dn, pn, qn = d.cpu().numpy(), pmat.cpu().numpy(), qmat.cpu().numpy()
    pt = np.ascontiguousarray(pn.T)
    return arpack_top(lambda v: dn[:, None] * v + pn @ (qn @ (pt @ v)), d.shape[0], k)


def top_eigenpairs_gram(t: torch.Tensor, k: int):
    """Top-k eigenpairs of T Tᵀ for T (p, q): values (k,) descending, vectors (p, k)."""
    p = t.shape[0]
    if dense(p, k, t.device):
        values, vectors = torch.linalg.eigh(t @ t.T)
        return values.flip(0)[:k], vectors.flip(1)[:, :k].contiguous()
    values, vectors, ok = _lanczos(lambda v: t @ (t.T @ v), 1, p, k, t.dtype, t.device)
    if bool(ok[0]):
        return values[0], vectors[0]
    tn = t.cpu().numpy()
    return arpack_top(lambda v: tn @ (tn.T @ v), p, k)


def dense(p: int, k: int, device: torch.device) -> bool:
    """Whether a dense eigh of the (p, p) problem beats Lanczos: small p, k close to p, or a GPU."""
    return p <= max(DENSE_LIMIT, 2 * k) or device.type != "cpu"


def arpack_top(matmat, p: int, k: int):
    """Implicitly restarted Lanczos (ARPACK) to machine precision, from a fixed start vector."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = LinearOperator((p, p), matvec=lambda v: matmat(v.reshape(p, -1)).ravel(),
                        matmat=matmat, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(p)
    values, vectors = eigsh(op, k=k, which="LA", v0=v0, ncv=min(p, max(2 * k + 1, 24)), tol=0)
    order = np.argsort(values)[::-1]
    return torch.from_numpy(values[order].copy()), torch.from_numpy(vectors[:, order].copy())


def _lanczos(apply, batch: int, p: int, k: int, dtype, device):
    """Lanczos with full reorthogonalisation on B operators at once, from one fixed start vector.

    apply: (B, p, c) -> (B, p, c). -> values (B, k), vectors (B, p, k), converged (B,) bool: True where every
    pair's true residual passed. The basis grows as needed, up to p columns (where Lanczos is exact).
    """
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(p, generator=gen, dtype=dtype).to(device)
    basis = (start / start.norm()).expand(batch, p)[:, :, None].contiguous()  # (B, p, j + 1)
    alpha, beta = [], []  # (B,) per step
    for j in range(p):
        v = basis[:, :, j:j + 1]
        w = apply(v)
        alpha.append((v * w).sum(dim=(1, 2)))
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            w = w - basis @ (basis.mT @ w)
        norm = w.norm(dim=(1, 2))
        scale = torch.stack(alpha).abs().amax(dim=0)
        fresh = norm <= 1e-10 * scale  # an invariant subspace: go on from a new direction
        if bool(fresh.any()):
            w = torch.where(fresh[:, None, None], _new_direction(basis, gen), w)
            norm = torch.where(fresh, torch.zeros_like(norm), norm)
        beta.append(norm)
        steps = j + 1
        if steps == p or (steps >= 2 * k + 8 and steps % _CHECK_EVERY == 0):
            values, vectors, ok = _ritz(apply, basis, torch.stack(alpha, 1), torch.stack(beta, 1), k)
            if bool(ok.all()) or steps == p:
                return values, vectors, ok
        basis = torch.cat([basis, w / w.norm(dim=(1, 2), keepdim=True)], dim=2)
    raise AssertionError("unreachable: the loop returns at step p")


def _new_direction(done: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random unit vector orthogonal to the columns of `done` (B, p, j), for each batch member."""
    batch, p, _ = done.shape
    w = torch.randn(batch, p, 1, generator=gen, dtype=done.dtype).to(done.device)
    for _ in range(2):
        w = w - done @ (done.mT @ w)
    return w


def _ritz(apply, basis, alpha, beta, k: int):
    """Top-k Ritz pairs of the Lanczos basis (B, p, m) and tridiagonal (α, β), with their true residuals."""
    tri = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
    theta, s = torch.linalg.eigh(tri)
    theta, s = theta.flip(-1)[:, :k], s.flip(-1)[:, :, :k]
    z = basis @ s  # (B, p, k)
    az = apply(z)
    residual = (az - z * theta[:, None, :]).norm(dim=1)  # (B, k)
    top = theta[:, :1].abs().clamp_min(torch.finfo(theta.dtype).tiny)
    ok = (residual <= _TOLERANCE * top).all(dim=1) & torch.isfinite(residual).all(dim=1)
    return theta, z, ok
