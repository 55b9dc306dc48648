"""The structured eigensolver (diag(d) + P Q Pᵀ) against LAPACK's dense eigh of the formed matrix."""

import numpy as np
import pytest
import torch

from intruder.analysis import eigen


def problem(p, w, seed, scale=1.0, zero_rows=(), repeat=None):
    """d descending (a weight spectrum's squares), P (p, w) and Q = [[R Rᵀ, I], [I, 0]] as a LoRA update makes."""
    g = np.random.default_rng(seed)
    s = np.sort(g.uniform(0.1, 3.0, p))[::-1]
    if repeat is not None:  # equal base values (a degenerate base spectrum)
        s[repeat[0]:repeat[1]] = s[repeat[0]]
    d = s**2
    r = w // 2
    pmat = scale * g.standard_normal((p, w)) / np.sqrt(p)
    pmat[list(zero_rows)] = 0.0
    rr = g.standard_normal((r, 3 * r))
    q = np.block([[rr @ rr.T / (3 * r), np.eye(r)], [np.eye(r), np.zeros((r, r))]])
    return d, pmat, q


def dense_top(d, pmat, q, k):
    values, vectors = np.linalg.eigh(np.diag(d) + pmat @ q @ pmat.T)
    return values[::-1][:k], vectors[:, ::-1][:, :k]


def assert_pairs(values, vectors, d, pmat, q, k, atol=1e-9):
    ref_values, ref_vectors = dense_top(d, pmat, q, k)
    np.testing.assert_allclose(values, ref_values, rtol=1e-12, atol=1e-12 * ref_values[0])
    overlap = np.abs(np.sum(np.asarray(vectors) * ref_vectors, axis=0))  # the same vectors up to sign
    np.testing.assert_allclose(overlap, 1.0, atol=atol)


@pytest.mark.parametrize("p,w,k", [(200, 16, 10), (300, 8, 10), (256, 32, 5), (400, 16, 20)])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0], ids=["small", "moderate", "dominant"])
def test_structured_solver_matches_dense_eigh(p, w, k, scale):
    problems = [problem(p, w, seed, scale) for seed in range(4)]
    found = eigen.low_rank_top(*[np.stack(parts) for parts in zip(*problems)], k)
    for pair, (d, pmat, q) in zip(found, problems):
        assert pair is not None  # certified: no fallback on problems with a clear gap
        assert_pairs(*pair, d, pmat, q, k)


def test_base_directions_the_update_misses_stay_eigenvectors():
    """Rows of P that are zero leave e_i an exact eigenvector (eigenvalue d_i): the top base directions here."""
    d, pmat, q = problem(240, 16, 0, scale=0.5, zero_rows=range(0, 6))
    values, vectors = eigen.top_eigenpairs(*map(torch.from_numpy, (d, pmat, q)), 10)
    assert_pairs(values.numpy(), vectors.numpy(), d, pmat, q, 10)


def test_every_answer_is_correct_when_certification_fails():
    """Equal base values and a k-th eigenvalue shared by a whole degenerate block: the structured solver may not
    certify it, then Lanczos answers; either way the values are LAPACK's and the vectors span the same space."""
    d, pmat, q = problem(240, 16, 3, scale=0.5, zero_rows=range(0, 12), repeat=(0, 12))
    values, vectors = eigen.top_eigenpairs(*map(torch.from_numpy, (d, pmat, q)), 10)
    ref_values, ref_vectors = dense_top(d, pmat, q, 12)
    np.testing.assert_allclose(values.numpy(), ref_values[:10], rtol=1e-12)
    # the degenerate block: the found vectors lie in the span of the 12 reference vectors of value d_0
    inside = ref_vectors.T @ vectors.numpy()
    np.testing.assert_allclose(np.linalg.norm(inside, axis=0), 1.0, atol=1e-9)


def test_the_certificate_rejects_a_missed_eigenpair():
    """Drop the true top pair from a converged answer: the inertia count sees k + 1 values above c."""
    d, pmat, q = problem(200, 16, 1, scale=3.0)
    values, vectors = dense_top(d, pmat, q, 12)
    ops = eigen._Operators(d[None], pmat[None], np.ascontiguousarray(pmat.T)[None], q[None],
                           np.linalg.inv(q)[None], 11)
    right = ops.certified(values[None, :11], vectors[None, :, :11], 10)[0]
    wrong = ops.certified(values[None, 1:12], vectors[None, :, 1:12], 10)[0]
    assert right is not None and wrong is None


def test_batches_and_single_problems_agree():
    problems = [problem(220, 16, seed, 2.0) for seed in range(5)]
    tensors = [tuple(map(torch.from_numpy, parts)) for parts in problems]
    together = eigen.top_eigenpairs_many(tensors, 10)
    for (values, vectors), parts in zip(together, tensors):
        alone_values, alone_vectors = eigen.top_eigenpairs(*parts, 10)
        np.testing.assert_allclose(values.numpy(), alone_values.numpy(), rtol=1e-13)
        np.testing.assert_allclose(np.abs(vectors.numpy()), np.abs(alone_vectors.numpy()), atol=1e-10)


def test_wide_updates_and_small_problems_take_the_other_solvers():
    """P wider than WOODBURY_WIDTH goes to Lanczos, p within DENSE_LIMIT to a dense eigh: same answers."""
    for p, w in [(300, 2 * eigen.WOODBURY_WIDTH), (eigen.DENSE_LIMIT, 16)]:
        d, pmat, q = problem(p, w, 7, scale=2.0)
        values, vectors = eigen.top_eigenpairs(*map(torch.from_numpy, (d, pmat, q)), 10)
        assert_pairs(values.numpy(), vectors.numpy(), d, pmat, q, 10)
