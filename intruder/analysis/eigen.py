"""Top-k eigenpairs of the symmetric positive semi-definite operators the analysis meets, both (p, p) and
never formed when p is large:
* diag(d) + P Q Pᵀ, d (p,), P (p, w), Q (w, w): the tuned Gram matrix of a low-rank update in the base basis;
* T Tᵀ for T (p, q): the Gram matrix of a dense tuned matrix.
A dense `eigh` where p is small or on a GPU, else implicitly restarted Lanczos (ARPACK) to machine precision.
"""

from __future__ import annotations

import numpy as np
import torch

DENSE_LIMIT = 128  # up to this size a dense eigh beats Lanczos (at 256 it did not, on Gemma)


def top_eigenpairs(d: torch.Tensor, pmat: torch.Tensor, qmat: torch.Tensor, k: int):
    """Top-k eigenpairs of diag(d) + P Q Pᵀ: values (k,) descending, vectors (p, k)."""
    if dense(d.shape[0], k, d.device):
        values, vectors = torch.linalg.eigh(torch.diag(d) + pmat @ qmat @ pmat.T)
        return values.flip(0)[:k], vectors.flip(1)[:, :k].contiguous()
    dn, pn, qn = d.numpy(), pmat.numpy(), qmat.numpy()
    pt = np.ascontiguousarray(pn.T)
    return arpack_top(lambda v: dn[:, None] * v + pn @ (qn @ (pt @ v)), d.shape[0], k)


def top_eigenpairs_gram(t: torch.Tensor, k: int):
    """Top-k eigenpairs of T Tᵀ for T (p, q): values (k,) descending, vectors (p, k)."""
    if dense(t.shape[0], k, t.device):
        values, vectors = torch.linalg.eigh(t @ t.T)
        return values.flip(0)[:k], vectors.flip(1)[:, :k].contiguous()
    tn = t.numpy()
    return arpack_top(lambda v: tn @ (tn.T @ v), t.shape[0], k)


def dense(p: int, k: int, device: torch.device) -> bool:
    """Whether a dense eigh of the (p, p) problem beats the iterative solvers: small p, k close to p, or a GPU."""
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
