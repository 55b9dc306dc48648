"""The paper's algorithm done the slow, obvious way: two full thin SVDs in float64. Tests and benchmarks
compare the fast method against it; it is not part of the public API."""

from __future__ import annotations

import torch


def brute_force(w0: torch.Tensor, wt: torch.Tensor, k: int = 10, side: str = "left"):
    """-> (max_cos (k,), tuned singular values (k,)): max_i |cos| of each top-k tuned vector with all base
    vectors of `side` ("left" or "right"), from full float64 SVDs of W_0 and W_t."""
    u0, _, v0h = torch.linalg.svd(w0.to(torch.float64), full_matrices=False)
    ut, st, vth = torch.linalg.svd(wt.to(torch.float64), full_matrices=False)
    if side == "left":
        cos = (ut[:, :k].T @ u0).abs()
    else:
        cos = (vth[:k] @ v0h.T).abs()
    return cos.max(dim=1).values, st[:k]


def brute_force_count(w0: torch.Tensor, wt: torch.Tensor, k: int = 10, threshold: float = 0.5,
                      side: str = "left") -> int:
    max_cos, _ = brute_force(w0, wt, k, side)
    return int((max_cos < threshold).sum())
