"""Top-k eigenpairs of the symmetric positive semi-definite operators the analysis meets, both (p, p) and
never formed when p is large:
* diag(d) + P Q Pᵀ, d (p,), P (p, w), Q (w, w) invertible: the tuned Gram matrix of a low-rank update in the
  base basis;
* T Tᵀ for T (p, q): the Gram matrix of a dense tuned matrix.

A dense `eigh` where p is small or on a GPU. Otherwise, for diag + low rank, Rayleigh–Ritz on the top base
directions and the update, refined by Rayleigh-quotient steps whose solves (A − θ)⁻¹ cost O(p w²) by
Woodbury's identity, each answer certified (every residual at rounding level, and exactly k eigenvalues above
the k-th found, by Sylvester's law of inertia). A problem that is not certified gets a dense eigh (up to
DENSE_FALLBACK); wide updates, larger uncertified problems and T Tᵀ go to implicitly restarted Lanczos
(ARPACK) to machine precision.
"""

from __future__ import annotations

import numpy as np
import torch

DENSE_LIMIT = 128  # up to this size a dense eigh beats Lanczos (at 256 it did not, on Gemma)
WOODBURY_WIDTH = 32  # widest P for the structured solver: its solves cost O(k p w²), Lanczos O(p w) per step
DENSE_FALLBACK = 2048  # up to this size a problem the structured solver cannot certify gets a dense eigh:
# Lanczos from one start vector finds one vector of a repeated eigenvalue (a degenerate k-th value is where
# certification fails), a dense eigh all of them
TOLERANCE = 1e-12  # accepted residual ‖A z − θ z‖ of each pair, relative to the largest eigenvalue
FLOOR = 1e-10  # ... or within this, relative to the largest eigenvalue, when the angle bound below holds
ANGLE = 1e-9  # largest accepted bound on the angle between a found and the true eigenvector then
_RESCUE = 3  # steps with Rayleigh–Ritz for the problems the others left unconverged
_STEPS = 5  # Rayleigh-quotient steps before a problem is given up (2-3 on Gemma 3 270M)


def top_eigenpairs(d: torch.Tensor, pmat: torch.Tensor, qmat: torch.Tensor, k: int):
    """Top-k eigenpairs of diag(d) + P Q Pᵀ: values (k,) descending, vectors (p, k)."""
    return top_eigenpairs_many([(d, pmat, qmat)], k)[0]


def top_eigenpairs_many(problems: list, k: int) -> list:
    """Top-k eigenpairs of several problems diag(d) + P Q Pᵀ, given as (d, P, Q) tensors of one device
    -> [(values (k,) descending, vectors (p, k))]. Problems of the same size are solved together."""
    found: list = [None] * len(problems)
    groups: dict[tuple, list[int]] = {}
    for i, (d, pmat, qmat) in enumerate(problems):
        p, w = pmat.shape
        if dense(p, k, d.device):
            values, vectors = torch.linalg.eigh(torch.diag(d) + pmat @ qmat @ pmat.T)
            found[i] = values.flip(0)[:k], vectors.flip(1)[:, :k].contiguous()
        elif w <= WOODBURY_WIDTH and p >= 3 * k + w + 1:
            groups.setdefault((p, w), []).append(i)
    for members in groups.values():
        stacked = [np.stack([problems[i][j].numpy() for i in members]) for j in range(3)]
        for i, pair in zip(members, low_rank_top(*stacked, k)):
            if pair is not None:
                found[i] = torch.from_numpy(pair[0]), torch.from_numpy(pair[1])
    for i, (d, pmat, qmat) in enumerate(problems):
        if found[i] is None:  # the structured solver did not apply or could not certify its answer
            if pmat.shape[1] <= WOODBURY_WIDTH and d.shape[0] <= DENSE_FALLBACK:  # it failed: rare, be sure
                values, vectors = torch.linalg.eigh(torch.diag(d) + pmat @ qmat @ pmat.T)
                found[i] = values.flip(0)[:k], vectors.flip(1)[:, :k].contiguous()
            else:
                found[i] = _arpack_low_rank(d.numpy(), pmat.numpy(), qmat.numpy(), k)
    return found


def _arpack_low_rank(d: np.ndarray, pmat: np.ndarray, qmat: np.ndarray, k: int):
    pt = np.ascontiguousarray(pmat.T)
    return arpack_top(lambda v: d[:, None] * v + pmat @ (qmat @ (pt @ v)), d.shape[0], k)


def low_rank_top(d: np.ndarray, pmat: np.ndarray, qmat: np.ndarray, k: int) -> list:
    """Top-k eigenpairs of B problems A_b = diag(d_b) + P_b Q_b P_bᵀ, d (B, p) descending, P (B, p, w),
    Q (B, w, w) invertible -> per problem (values (k,) descending, vectors (p, k)), or None where the answer
    cannot be certified (then the caller solves it otherwise). Batched, so that the Python between the LAPACK
    calls is paid once per batch, not once per matrix.

    1. Rayleigh–Ritz on span(e_1 … e_2k, P): the top base directions and the update's.
    2. Rayleigh-quotient steps: for the top k + 1 Ritz pairs (θ_j, z_j), x_j = (A − θ_j)⁻¹ z_j by Woodbury,
       (A − θ)⁻¹ = D_θ⁻¹ − D_θ⁻¹ P (Q⁻¹ + Pᵀ D_θ⁻¹ P)⁻¹ Pᵀ D_θ⁻¹ with D_θ = diag(d) − θ, in O(k p w²); then
       Rayleigh–Ritz on span(z, x) after the first step, each x_j with its own Rayleigh quotient after the
       others (they converge cubically); until every residual ‖A z_j − θ_j z_j‖ ≤ TOLERANCE · θ_1, or a step
       no longer helps (see `_converged` for what is accepted then). A last Rayleigh–Ritz on span(z).
    3. Certificate: with c between θ_k and θ_{k+1}, the number of eigenvalues of A above c is
       #(d > c) + n₊(−Q⁻¹ − Pᵀ D_c⁻¹ P) − n₊(−Q⁻¹) (Haynsworth's inertia additivity on [[D_c, P], [Pᵀ, −Q⁻¹]]);
       it must be k, so that the k pairs found are the top k and none was missed.
    """
    batch, p, w = pmat.shape
    n, h = k + 1, 2 * k
    try:
        qinv = np.linalg.inv(qmat)
    except np.linalg.LinAlgError:
        return [None] * batch
    pt = np.ascontiguousarray(pmat.transpose(0, 2, 1))
    ops = _Operators(d, pmat, pt, qmat, qinv, n)
    theta, z, az = ops.start(h)
    before = np.full(batch, np.inf)  # each problem's largest residual after the step before
    for step in range(_STEPS):
        done, worst = _converged(theta, z, az, k)
        stalled = (worst > 0.1 * before) & (worst <= FLOOR)  # at a floor rounding sets: more steps won't help
        todo = np.flatnonzero(~done & ~stalled)
        if todo.size == 0:
            break
        before = worst
        every = todo.size == batch
        idx = slice(None) if every else todo  # every problem: no gathered copies
        found = ops.refine(idx, theta[idx], z[idx], az[idx], ritz=step == 0)
        if every:
            theta, z, az = found
        else:
            theta[todo], z[todo], az[todo] = found
    mixed = np.flatnonzero(~_settled(theta, z))  # pairs a last Rayleigh–Ritz would change, for the certificate
    if mixed.size:
        theta[mixed], z[mixed], az[mixed] = ops.ritz(mixed, _orthonormal(z[mixed]))
    done, _ = _converged(theta, z, az, k, floor=True)
    for _ in range(_RESCUE):  # two pairs that went to one eigenvector: steps with Rayleigh–Ritz separate them
        todo = np.flatnonzero(~done)
        if todo.size == 0:
            break
        theta[todo], z[todo], az[todo] = ops.refine(todo, theta[todo], z[todo], az[todo], ritz=True)
        done[todo], _ = _converged(theta[todo], z[todo], az[todo], k, floor=True)
    return [pair if ok else None for pair, ok in zip(ops.certified(theta, z, k), done)]


def _settled(theta: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(B,) whether each problem's pairs are already those a Rayleigh–Ritz on span(z) would give: z orthonormal
    to rounding (‖zᵀz − I‖_max ≤ 1e-12; Rayleigh-quotient steps leave it so in 98 % of the Gemma problems) and θ
    descending. Then distinct unit vectors with residuals at rounding level stand for distinct eigenvalues."""
    gram = z.transpose(0, 2, 1) @ z
    gram -= np.eye(z.shape[2])
    return (np.abs(gram).max(axis=(1, 2)) <= 1e-12) & (np.diff(theta, axis=1) <= 0).all(axis=1)


def _solve(a: np.ndarray, b: np.ndarray):
    """x with a x = b for a (..., w, w), b (..., w), and where a is exactly singular (x = 0 there)."""
    try:
        return np.linalg.solve(a, b[..., None])[..., 0], np.zeros(a.shape[:-2], dtype=bool)
    except np.linalg.LinAlgError:  # rare: one by one
        x, singular = np.zeros_like(b), np.zeros(a.shape[:-2], dtype=bool)
        for i in np.ndindex(*a.shape[:-2]):
            try:
                x[i] = np.linalg.solve(a[i], b[i])
            except np.linalg.LinAlgError:
                singular[i] = True
        return x, singular


def _converged(theta: np.ndarray, z: np.ndarray, az: np.ndarray, k: int, floor: bool = False):
    """-> ((B,) whether every one of the top k pairs is accurate, (B,) the largest residual relative to θ_1).

    Accurate: the residual ‖A z_j − θ_j z_j‖ within TOLERANCE · θ_1; with `floor` (once more steps no longer
    help: rounding in the solves can leave a floor near 1e-11 · θ_1, in one Gemma problem in a hundred), also
    within FLOOR · θ_1 and small enough next to θ_j's distance to its neighbours that z_j's angle to the true
    eigenvector, at most residual / distance (Davis–Kahan), is below ANGLE."""
    difference = az[:, :, :k] - z[:, :, :k] * theta[:, None, :k]
    residual = np.sqrt(np.einsum("bpk,bpk->bk", difference, difference))
    scale = np.abs(theta[:, :1])
    good = residual <= TOLERANCE * scale
    if floor:
        gaps = -np.diff(theta, axis=1)  # (B, n - 1): θ_j − θ_{j+1} >= 0
        above = np.concatenate([np.full_like(gaps[:, :1], np.inf), gaps[:, : k - 1]], axis=1)
        good |= (residual <= FLOOR * scale) & (residual <= ANGLE * np.minimum(above, gaps[:, :k]))
    return good.all(axis=1), (residual / scale).max(axis=1)


class _Operators:
    """The B operators diag(d_b) + P_b Q_b P_bᵀ of one batch, applied and solved with batched array operations."""

    def __init__(self, d, pmat, pt, qmat, qinv, n):
        self.d, self.pmat, self.pt, self.qmat, self.qinv, self.n = d, pmat, pt, qmat, qinv, n

    def start(self, h: int):
        """Rayleigh–Ritz on span(e_1 … e_h, U), U an orthonormal basis of P's rows below h, formed block by
        block: A's h x h head, U's products with P and diag(d), no product of A with the whole basis."""
        d, pmat, pt, qmat = self.d, self.pmat, self.pt, self.qmat
        batch, p, w = pmat.shape
        tail = pmat.copy()
        tail[:, :h] = 0  # P's part orthogonal to e_1 … e_h
        u = _orthonormal(tail)  # (B, p, w), rows above h zero
        head, pu = pmat[:, :h], pt @ u  # (B, h, w), (B, w, w): Pᵀ U
        g = np.empty((batch, h + w, h + w))
        g[:, :h, :h] = head @ qmat @ head.transpose(0, 2, 1)
        g[:, :h, :h] += d[:, :h, None] * np.eye(h)
        g[:, :h, h:] = head @ (qmat @ pu)
        g[:, h:, :h] = g[:, :h, h:].transpose(0, 2, 1)
        g[:, h:, h:] = (u.transpose(0, 2, 1) * d[:, None, :]) @ u + pu.transpose(0, 2, 1) @ qmat @ pu
        theta, s = self._top(g)
        z = u @ s[:, h:]
        z[:, :h] += s[:, :h]
        return theta, z, self.apply(slice(None), z)

    def ritz(self, idx, q, known=None):
        """The top n Ritz pairs on span(q_b), q (b, p, c) orthonormal, of problems idx -> θ (b, n) descending,
        vectors (b, p, n) and A times them. known: A times the first columns of q, when already computed."""
        if known is None:
            aq = self.apply(idx, q)
        else:
            aq = np.concatenate([known, self.apply(idx, q[:, :, known.shape[2]:])], axis=2)
        theta, s = self._top(q.transpose(0, 2, 1) @ aq)
        return theta, q @ s, aq @ s

    def _top(self, g):
        """The top n eigenpairs of the symmetric part of each g (b, c, c): values (b, n) descending, vectors
        (b, c, n)."""
        theta, s = np.linalg.eigh((g + g.transpose(0, 2, 1)) * 0.5)
        return theta[:, : -self.n - 1 : -1], s[:, :, : -self.n - 1 : -1]

    def refine(self, idx, theta, z, az, ritz: bool):
        """One Rayleigh-quotient step for problems idx, from the pairs (θ_j, z_j): x_j = (A − θ_j)⁻¹ z_j; then
        Rayleigh–Ritz on span(z, x) when `ritz` (the first step, from rough pairs), else each x_j with its own
        Rayleigh quotient (the steps after, which converge cubically) -> (θ, z, A z)."""
        d, pmat, pt = self.d[idx], self.pmat[idx], self.pt[idx]
        b, p, w = pmat.shape
        n = self.n
        shifted = d[:, None, :] - theta[:, :, None]  # (b, n, p): diag(D_θj)
        tiny = np.finfo(d.dtype).eps * np.maximum(np.abs(d[:, :1, None]), np.finfo(d.dtype).tiny)
        shifted = np.where(np.abs(shifted) < tiny, tiny, shifted)  # θ_j on a base value: a direction suffices
        inv = 1.0 / shifted
        y = z.transpose(0, 2, 1) * inv  # (b, n, p): D_θ⁻¹ z_j
        middle = np.empty((b, n, w, w))
        for j in range(n):  # Q⁻¹ + Pᵀ D_θj⁻¹ P, one shift at a time (a (b, w, p) temporary)
            np.matmul(pt * inv[:, j, None, :], pmat, out=middle[:, j])
        middle += self.qinv[idx, None]
        t, singular = _solve(middle, y @ pmat)  # (b, n, w)
        x = (y - (t @ pt) * inv).transpose(0, 2, 1)  # (b, p, n): (A − θ_j)⁻¹ z_j
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = np.where(singular[:, None, :], z, x)  # θ_j is an eigenvalue to the last bit: z_j stays
        if ritz:
            zt = z.transpose(0, 2, 1)
            x -= z @ (zt @ x)  # twice: x is mostly z near convergence
            x -= z @ (zt @ x)
            return self.ritz(idx, np.concatenate([z, _orthonormal(x)], axis=2), known=az)
        ax = self.apply(idx, x)
        return (x * ax).sum(axis=1), x, ax

    def apply(self, idx, v):
        """A_b v_b for problems idx, v (b, p, c)."""
        return self.d[idx, :, None] * v + self.pmat[idx] @ (self.qmat[idx] @ (self.pt[idx] @ v))

    def certified(self, theta, z, k):
        """Per problem (values (k,), vectors (p, k)) when exactly k eigenvalues lie above the middle of θ_k and
        θ_{k+1} and those two are apart; else None."""
        c = 0.5 * (theta[:, k - 1] + theta[:, k])
        shifted = self.d - c[:, None]
        apart = theta[:, k - 1] - theta[:, k] > 1e-10 * np.abs(theta[:, 0])
        apart &= (shifted != 0).all(axis=1)
        shifted = np.where(shifted == 0, 1.0, shifted)
        schur = -self.qinv - (self.pt / shifted[:, None, :]) @ self.pmat
        above = (self.d > c[:, None]).sum(axis=1) + _positive(schur) - _positive(-self.qinv)
        ok = apart & (above == k)
        return [(theta[b, :k].copy(), np.ascontiguousarray(z[b, :, :k])) if ok[b] else None
                for b in range(len(ok))]


def _positive(m: np.ndarray) -> np.ndarray:
    """How many eigenvalues of the symmetric part of each m (b, w, w) are positive."""
    return (np.linalg.eigvalsh((m + m.transpose(0, 2, 1)) * 0.5) > 0).sum(axis=-1)


def _orthonormal(b: np.ndarray) -> np.ndarray:
    """Orthonormal bases of span(b_i), b (B, p, c) of full column rank: Cholesky QR, twice where the first pass
    leaves columns measurably non-orthogonal; Householder QR where b is ill-conditioned."""
    q = b
    for _ in range(2):
        try:
            q = q @ np.linalg.inv(np.linalg.cholesky(q.transpose(0, 2, 1) @ q)).transpose(0, 2, 1)
        except np.linalg.LinAlgError:
            return np.linalg.qr(b)[0]
        error = q.transpose(0, 2, 1) @ q - np.eye(q.shape[2])
        if np.abs(error).max() < 1e-14:
            return q
    return np.linalg.qr(b)[0] if np.abs(error).max() > 1e-8 else q


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
