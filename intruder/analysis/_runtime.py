"""How the analysis runs on a machine: threads, reused buffers, the heap.

None of this changes a result; it is here so that `intruders.py` reads as the mathematics.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from contextlib import contextmanager

import torch

from ..weights import SafetensorsWeights, Weights


@contextmanager
def torch_threads(n: int | None):
    """Run torch with `n` intra-op threads inside the block (None: leave as is)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Workspace:
    """One worker's reusable buffers, grown to the largest matrix: reading and converting each matrix into
    memory that is already mapped avoids page-faulting a fresh allocation per matrix (a third of the time of a
    read). Each worker thread of `projection.analyse_all` has its own.

    threads: how many threads a base decomposition may use (the worker's share of the cores).
    """

    def __init__(self, device: torch.device, threads: int = 1):
        self.device, self.threads = device, threads
        self.buffers: dict[int, torch.Tensor] = {}  # float64, per slot: 0 W_0, 1 W_t, 2 a block of rows
        self.raw: dict[torch.dtype, torch.Tensor] = {}  # read buffers, per stored dtype
        self.entry = bytearray()  # the bytes of a cache entry

    def read(self, weights: Weights, name: str) -> torch.Tensor:
        """`weights.get(name)`, into a reused buffer where the reader supports it (safetensors)."""
        if not isinstance(weights, SafetensorsWeights):
            return weights.get(name)
        numel, dtype = math.prod(weights.shape(name)), weights.dtype(name)
        buf = self.raw.get(dtype)
        if buf is None or buf.numel() < numel:
            self.raw.pop(dtype, None)  # release the old buffer before growing
            buf = self.raw[dtype] = torch.empty(numel, dtype=dtype)
        return weights.get(name, out=buf)

    def entry_buffer(self, nbytes: int) -> bytearray:
        """A reused buffer of at least `nbytes` bytes for a cache entry (its tensors are views into it)."""
        if len(self.entry) < nbytes:
            self.entry = bytearray()  # release the old buffer before growing
            self.entry = bytearray(nbytes)
        return self.entry

    def release(self) -> None:
        """Drop every buffer (views handed out stay valid until they are dropped too)."""
        self.buffers.clear()
        self.raw.clear()
        self.entry = bytearray()

    def f64(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        """A float64 copy of `w` on the device, owned by this workspace until the next call for `slot`."""
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < w.numel():
            self.buffers.pop(slot, None)
            buf = self.buffers[slot] = torch.empty(w.numel(), dtype=torch.float64, device=self.device)
        return buf[: w.numel()].view(w.shape).copy_(w)


def worker_count(device: torch.device, matrices: int, asked: int | None = None) -> int:
    """How many matrices to analyse side by side: `asked`, else one per torch thread on a CPU (at most
    MAX_WORKERS); one on a GPU; never more than there are matrices. Each worker holds its own matrix."""
    if device.type != "cpu":
        return 1
    return max(1, min(asked or min(torch.get_num_threads(), MAX_WORKERS), matrices))


MAX_WORKERS = 8


@contextmanager
def cpu_threads(device: torch.device, threads: int = 1):
    """On the CPU, run torch and the BLAS under numpy/scipy with `threads` threads in the block.

    The work on one matrix is a chain of small products and solves: waking a second thread for each costs
    more than it saves, while whole matrices side by side (`workers`) keep every core busy. Measured on Gemma 3
    270M (2 cores): torch single-threaded made the warm analysis 1.6x faster, and OpenBLAS single-threaded
    another 1.2x, before the matrices ran side by side.

    The limits are global to the process: with several workers they are set once around the whole analysis,
    never per matrix, or one worker's exit from the block would lift the limit under another.
    """
    if device.type != "cpu":
        yield
        return
    import scipy.linalg  # noqa: F401 (its BLAS must be loaded to be limited)
    import scipy.sparse.linalg  # noqa: F401 (ARPACK's)
    from threadpoolctl import threadpool_limits

    with torch_threads(threads), threadpool_limits(threads, user_api="blas"):
        yield


def trim_heap() -> None:
    """Give memory freed by the last matrix back to the OS. glibc keeps freed blocks of up to 32 MB in its
    heap, so without this the resident size of a long run grows far past what the analysis holds."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None

