"""Singular spectra: the base factors of a pretrained matrix, their on-disk cache, effective and stable rank.

Notation: W (m, n) = U diag(S) Vᵀ, S descending. p = min(m, n) is the *small side*: the base factors are the
complete basis of that side (U when m <= n, else V), found by `eigh` of the float64 Gram matrix, which is
about twice as fast as an SVD and gives the same vectors wherever the spectrum has a gap.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptWeightsError, NonFiniteError
from ..outputs import atomic_write, default_cache_dir
from ..weights.safetensors import read_safetensors, write_safetensors

FORMAT_VERSION = "2"
_RECOMPUTED = "this cache entry will be recomputed and replaced"


@dataclass(frozen=True)
class BaseFactors:
    """The complete singular basis of the small side of W0 (m, n).

    basis: (p, p) float64, columns are singular vectors by descending `sigma`; left vectors when `left`.
    sigma: (p,) float64, the singular values of W0, descending.
    left: True when m <= n (basis spans the output side), False when the basis is V.
    """

    basis: torch.Tensor
    sigma: torch.Tensor
    left: bool

    def to(self, device: torch.device | str) -> BaseFactors:
        return BaseFactors(self.basis.to(device), self.sigma.to(device), self.left)


def base_factors(w: torch.Tensor) -> BaseFactors:
    """W0 (m, n) -> BaseFactors of its small side, via eigh of W0 W0ᵀ or W0ᵀ W0 in float64.

    Raises NonFiniteError when W0 holds NaN or Inf (every such entry reaches the Gram matrix's diagonal).
    """
    left = w.shape[0] <= w.shape[1]
    gram = _small_side_gram(w)
    if not bool(torch.isfinite(gram.diagonal()).all()):
        raise NonFiniteError("the matrix holds NaN or Inf values")
    values, vectors = torch.linalg.eigh(gram)
    del gram
    basis = vectors.flip(-1).contiguous()
    del vectors
    return BaseFactors(basis, values.flip(-1).clamp_min(0).sqrt(), left)


def effective_rank(x) -> float:
    """Effective rank of Roy & Vetterli (2007): exp of the entropy of σ / Σσ.

    x: a matrix (its singular values are computed in float64) or a 1-D array of singular values.
    """
    sigma = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if sigma.ndim == 2:
        sigma = torch.linalg.svdvals(sigma)
    elif sigma.ndim != 1:
        raise ValueError(f"effective_rank takes a matrix or a 1-D tensor of singular values, got {sigma.ndim}-D")
    if bool((sigma < 0).any()) or not bool(torch.isfinite(sigma).all()):
        raise ValueError("singular values must be finite and non-negative")
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(sigma) -> float:
    """‖W‖_F² / ‖W‖_2² from singular values; 0 for a zero matrix."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    top = sigma.max() if sigma.numel() else torch.tensor(0.0)
    return 0.0 if top == 0 else float((sigma**2).sum() / top**2)


def low_rank_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """All nonzero singular values of left @ right, left (m, r), right (r, n) -> (r,), in O((m + n) r²)."""
    _, r_left = torch.linalg.qr(left.to(torch.float64))
    _, r_right = torch.linalg.qr(right.to(torch.float64).T)
    return torch.linalg.svdvals(r_left @ r_right.T)


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values of W, descending, from the float64 Gram matrix of its small side."""
    return torch.linalg.eigvalsh(_small_side_gram(w)).flip(0).clamp_min(0).sqrt()


def _small_side_gram(w: torch.Tensor) -> torch.Tensor:
    """W (m, n) -> W Wᵀ (m, m) if m <= n else Wᵀ W (n, n), in float64."""
    w = w.to(torch.float64)
    return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w


def tensor_digest(w: torch.Tensor) -> str:
    """A content hash of a tensor: dtype, shape and raw bytes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{w.dtype}|{tuple(w.shape)}|".encode())
    h.update(w.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class FactorCache:
    """Base factors on disk, keyed by the content hash of the base tensor.

    Entries are safetensors files written to a temporary name and renamed into place, so a reader never sees
    a half-written entry and two processes filling the same entry both succeed. An entry that cannot be read,
    fails its checksum, or was written for another tensor is recomputed and replaced with a warning, never
    trusted. Hashing a large tensor costs about as much as reading it, so the hash of a tensor inside an
    unchanged file (same path, size, mtime, ctime and inode) is remembered in `digests/`.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self._memos: dict[str, dict[str, str]] = {}

    def factors(self, w: torch.Tensor, fingerprint: str | None = None) -> BaseFactors:
        """BaseFactors of `w`, from the cache when an intact entry exists, else computed and stored."""
        key = self.key(w, fingerprint)
        return self.load(key, tuple(w.shape)) or self.store(key, tuple(w.shape), base_factors(w))

    def _path(self, key: str) -> Path:
        return self.directory / "factors" / key[:2] / f"{key}.safetensors"

    def key(self, w: torch.Tensor, fingerprint: str | None = None) -> str:
        """The content hash of `w`; `fingerprint` (see `Weights.fingerprint`) lets an unchanged file skip it."""
        if fingerprint is None:
            return tensor_digest(w)
        file, _, tensor = fingerprint.rpartition("|")
        memo = self._memo(file)
        if tensor not in memo:
            memo[tensor] = tensor_digest(w)
            path = self._memo_path(file)
            text = json.dumps(memo).encode()
            try:
                atomic_write(path, lambda tmp: tmp.write_bytes(text))
            except OSError:
                pass  # only a missed shortcut next time
        return memo[tensor]

    def _memo(self, file: str) -> dict[str, str]:
        """{tensor: digest} remembered for one unchanged weights file (path, size, mtime, ctime, inode)."""
        if file not in self._memos:
            try:
                memo = json.loads(self._memo_path(file).read_text())
            except (OSError, ValueError):
                memo = {}
            self._memos[file] = memo if isinstance(memo, dict) else {}
        return self._memos[file]

    def _memo_path(self, file: str) -> Path:
        name = hashlib.blake2b(file.encode(), digest_size=16).hexdigest()
        return self.directory / "digests" / f"{name}.json"

    def load(self, key: str, shape: tuple[int, ...]) -> BaseFactors | None:
        """The entry for `key`, or None when there is none or it is damaged (with a warning)."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            tensors, meta = read_safetensors(path, advice=_RECOMPUTED)
            basis, sigma = tensors["basis"], tensors["sigma"].clone()  # sigma outlives the file buffer
            problem = _check_entry(meta, key, shape, basis, sigma)
        except CorruptWeightsError as exc:  # names the entry and says it is recomputed
            problem = str(exc)
        except Exception as exc:  # any unreadable entry is recomputed, never fatal
            problem = f"cache entry {path} is unreadable ({type(exc).__name__}: {exc}); {_RECOMPUTED}"
        else:
            if problem is None:
                return BaseFactors(basis, sigma, meta["left"] == "1")
            problem = f"cache entry {path} is {problem}; {_RECOMPUTED}"
        warnings.warn(f"{problem} (to clear the whole cache, delete {self.directory})", RuntimeWarning,
                      stacklevel=2)
        return None

    def store(self, key: str, shape: tuple[int, ...], factors: BaseFactors) -> BaseFactors:
        """Write an entry atomically (a warning, not an error, when the cache is not writable)."""
        path = self._path(key)
        basis, sigma = factors.basis.cpu().contiguous(), factors.sigma.cpu().contiguous()
        meta = {
            "version": FORMAT_VERSION,
            "key": key,
            "shape": ",".join(map(str, shape)),
            "left": "1" if factors.left else "0",
            "checksum": str(_checksum(basis, sigma)),
        }
        try:
            atomic_write(path, lambda tmp: write_safetensors(tmp, {"basis": basis, "sigma": sigma}, meta))
        except OSError as exc:
            warnings.warn(f"cannot write the factor cache at {path} ({exc}); continuing without it",
                          RuntimeWarning, stacklevel=2)
        return factors


def _check_entry(meta: dict, key: str, shape: tuple[int, ...], basis, sigma) -> str | None:
    """None when a cache entry is intact and belongs to `key`, else what is wrong with it."""
    if meta.get("version") != FORMAT_VERSION:
        return f"of format version {meta.get('version')!r}, not {FORMAT_VERSION}"
    if meta.get("key") != key or meta.get("shape") != ",".join(map(str, shape)):
        return "stale (written for another tensor)"
    p = min(shape)
    if tuple(basis.shape) != (p, p) or tuple(sigma.shape) != (p,):
        return "of the wrong size"
    if meta.get("checksum") != str(_checksum(basis, sigma)):
        return "corrupt (checksum mismatch)"
    return None


def _checksum(*tensors: torch.Tensor) -> int:
    """A wrapping sum of the payload's 64-bit words: catches truncation, zeroed pages and flipped bits at
    memory speed (CRC-32 ran at 1.7 GB/s here, a third of a warm analysis's time on its own)."""
    total = 0
    for t in tensors:
        words = t.contiguous().view(-1).view(torch.uint8)
        pad = (-words.numel()) % 8
        if pad:
            words = torch.cat([words, words.new_zeros(pad)])
        total = (total + int(words.view(torch.int64).sum())) % 2**64
    return total

