"""Singular spectra: the base factors of a pretrained matrix, their on-disk cache, effective and stable rank.

Notation: W (m, n) = U diag(S) Vᵀ, S descending. p = min(m, n) is the *small side*: the base factors are the
complete basis of that side (U when m <= n, else V), found by `eigh` of the float64 Gram matrix, which is
about twice as fast as an SVD and gives the same vectors wherever the spectrum has a gap.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptWeightsError, NonFiniteError
from ..outputs import atomic_write, default_cache_dir
from ..weights.safetensors import read_safetensors, write_safetensors
from . import cachelock

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
    """W0 (m, n), in any float dtype -> BaseFactors of its small side, via eigh of W0 W0ᵀ or W0ᵀ W0 in float64.

    Raises NonFiniteError when W0 holds NaN or Inf (every such entry reaches the Gram matrix's diagonal).
    On a CPU the eigh is numpy's (LAPACK's divide and conquer, dsyevd): 1.25x faster here than torch's on one
    thread, and unlike scipy's wrappers it releases the GIL, so that workers decompose side by side.
    """
    left = w.shape[0] <= w.shape[1]
    gram = _small_side_gram(w)
    if not bool(torch.isfinite(gram.diagonal()).all()):
        raise NonFiniteError("the matrix holds NaN or Inf values")
    if gram.device.type == "cpu":
        values, vectors = np.linalg.eigh(gram.numpy(), UPLO="U")
        values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    else:
        values, vectors = torch.linalg.eigh(gram, UPLO="U")
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
    _, r_left = torch.linalg.qr(left.to(torch.float64), mode="r")  # R only: Q is never formed
    _, r_right = torch.linalg.qr(right.to(torch.float64).T, mode="r")
    return torch.linalg.svdvals(r_left @ r_right.T)


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values of W, descending, from the float64 Gram matrix of its small side."""
    return torch.linalg.eigvalsh(_small_side_gram(w), UPLO="U").flip(0).clamp_min(0).sqrt()


def _small_side_gram(w: torch.Tensor) -> torch.Tensor:
    """W (m, n), any float dtype -> W Wᵀ (m, m) if m <= n else Wᵀ W (n, n), in float64.

    On the CPU, summed over blocks of W converted to float64 one at a time, so that no float64 copy of the
    whole matrix exists; numpy runs each block's product as a symmetric rank-k update (dsyrk: half the
    multiplications of a product, 1.8x faster on a 640 x 2048 matrix) and releases the GIL meanwhile.
    """
    if w.device.type != "cpu":
        w = w.to(torch.float64)
        return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    left = w.shape[0] <= w.shape[1]
    p, long = min(w.shape), max(w.shape)
    gram = np.zeros((p, p))
    step = max(1, GRAM_BLOCK // (8 * p))
    for start in range(0, long, step):
        block = (w[:, start:start + step] if left else w[start:start + step]).to(torch.float64)
        a = block.contiguous().numpy()
        gram += a @ a.T if left else a.T @ a
    return torch.from_numpy(gram)


GRAM_BLOCK = 2 << 20  # bytes of float64 per block of the Gram matrix's sum


def tensor_digest(w: torch.Tensor) -> str:
    """A content hash of a tensor: dtype, shape and raw bytes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{w.dtype}|{tuple(w.shape)}|".encode())
    h.update(w.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class FactorCache:
    """Base factors on disk, keyed by the content hash of the base tensor.

    Entries are safetensors files written to a temporary name and renamed into place, so a reader never sees
    a half-written entry. The cache may be shared by concurrent processes (the ranks of a job, on a shared file
    system): `load` of a missing entry takes its lock file (see `cachelock`), so that exactly one process
    computes it while the others wait for it, and `store` releases the lock. An entry that cannot be read,
    fails its checksum, or was written for another tensor is recomputed and replaced with a warning, never
    trusted. Hashing a large tensor costs about as much as reading it, so the hash of a tensor inside an
    unchanged file (same path, size, mtime, ctime and inode) is remembered in `digests/`.

    stale_after: seconds after which a lock whose holder shows no sign of life is broken (`cachelock`).
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, stale_after: float = cachelock.STALE_AFTER):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.stale_after = stale_after
        self._memos: dict[str, dict[str, str]] = {}
        self._locks: set[Path] = set()  # entry locks `load` took and `store` has not released yet
        self._guard = threading.Lock()  # the workers of one analysis share this cache
        self._memo_writer = threading.Lock()

    def factors(self, w: torch.Tensor, fingerprint: str | None = None) -> BaseFactors:
        """BaseFactors of `w`, from the cache when an intact entry exists, else computed and stored."""
        key = self.key(w, fingerprint)
        found = self.load(key, tuple(w.shape))
        if found is not None:
            return found
        try:
            computed = base_factors(w)
        except BaseException:
            self.release()
            raise
        return self.store(key, tuple(w.shape), computed)

    def known(self, fingerprint: str | None) -> bool:
        """Whether an entry exists for the tensor with this `Weights.fingerprint`, as far as the cache can tell
        without reading the tensor: False when its content hash is not remembered (or fingerprint is None)."""
        if fingerprint is None:
            return False
        file, _, tensor = fingerprint.rpartition("|")
        with self._guard:
            digest = self._memo(file).get(tensor)
        return digest is not None and self._path(digest).exists()

    def release(self) -> None:
        """Give up every entry lock this cache took and did not store (after a failure between the two)."""
        with self._guard:
            locks, self._locks = self._locks, set()
        for lock in locks:
            cachelock.release(lock)

    def _path(self, key: str) -> Path:
        return self.directory / "factors" / key[:2] / f"{key}.safetensors"

    def _lock_path(self, key: str) -> Path:
        return self._path(key).with_suffix(".lock")

    def key(self, w: torch.Tensor, fingerprint: str | None = None) -> str:
        """The content hash of `w`; `fingerprint` (see `Weights.fingerprint`) lets an unchanged file skip it."""
        if fingerprint is None:
            return tensor_digest(w)
        file, _, tensor = fingerprint.rpartition("|")
        with self._guard:
            digest = self._memo(file).get(tensor)
        if digest is None:
            digest = tensor_digest(w)
            with self._guard:  # workers of one analysis add to the same memo
                self._memo(file)[tensor] = digest
            with self._memo_writer:  # the last file written holds every digest added before it
                with self._guard:
                    text = json.dumps(self._memo(file)).encode()
                try:
                    atomic_write(self._memo_path(file), lambda tmp: tmp.write_bytes(text))
                except OSError:
                    pass  # only a missed shortcut next time
        return digest

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

    def load(self, key: str, shape: tuple[int, ...], buffer=None) -> BaseFactors | None:
        """The entry for `key`; or None when there is none or it is damaged (with a warning): then this cache
        holds the entry's lock, and its caller should compute the factors and `store` them (or `release`).

        buffer: a function of a byte count returning a reusable bytearray at least that long, read into
        (the basis is then a view into it, valid until the buffer is reused); None reads into new memory.

        While another process (or another thread of this one) holds the lock, waits for its entry, polling 10 ms
        to 0.25 s apart; a stale lock (see `cachelock`) is broken.
        """
        path, lock = self._path(key), self._lock_path(key)
        waiter, damaged = None, None  # damaged: the stat of an entry found damaged, not to be read again
        while True:
            seen = _stat(path)
            if seen is not None and seen != damaged:
                found = self._read(key, shape, path, buffer)
                if found is not None:
                    return found
                damaged = seen
            if cachelock.acquire(lock):
                if seen is None and path.exists():  # written between our look and our lock
                    cachelock.release(lock)
                    continue
                with self._guard:
                    self._locks.add(lock)
                return None
            waiter = waiter or cachelock.Waiter(lock, self.stale_after)
            if waiter.stale():
                waiter.break_lock()
            else:
                waiter.sleep()

    def _read(self, key: str, shape: tuple[int, ...], path: Path, buffer=None) -> BaseFactors | None:
        """The entry at `path`, or None when it is damaged (with a warning)."""
        try:
            tensors, meta = read_safetensors(path, advice=_RECOMPUTED, buffer=buffer)
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
                      stacklevel=3)
        return None

    def store(self, key: str, shape: tuple[int, ...], factors: BaseFactors) -> BaseFactors:
        """Write an entry atomically (a warning, not an error, when the cache is not writable), then release
        its lock."""
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
        finally:
            with self._guard:
                self._locks.discard(self._lock_path(key))
            cachelock.release(self._lock_path(key))
        return factors


def _stat(path: Path):
    """(inode, mtime, size) of `path`, None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


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

