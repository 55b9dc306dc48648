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
    """Reusable buffers grown to the largest matrix: reading and converting each matrix into memory that is
    already mapped avoids page-faulting a fresh allocation per matrix (a third of the time of a read).

    Buffers are kept per slot, so that two matrices in flight (one being read, one computed) use their own.
    """

    def __init__(self, device: torch.device, threads: int):
        self.device, self.threads = device, threads  # threads: for the base decompositions
        self.buffers: dict[int, torch.Tensor] = {}  # float64, per slot
        self.raw: dict[tuple, torch.Tensor] = {}  # read buffers, per (stored dtype, slot)

    def read(self, weights: Weights, name: str, slot: int = 0) -> torch.Tensor:
        """`weights.get(name)`, into a reused buffer where the reader supports it (safetensors)."""
        if not isinstance(weights, SafetensorsWeights):
            return weights.get(name)
        numel, key = math.prod(weights.shape(name)), (weights.dtype(name), slot)
        buf = self.raw.get(key)
        if buf is None or buf.numel() < numel:
            self.raw.pop(key, None)  # release the old buffer before growing
            buf = self.raw[key] = torch.empty(numel, dtype=key[0])
        return weights.get(name, out=buf)

    def release(self) -> None:
        """Drop every buffer (views handed out stay valid until they are dropped too)."""
        self.buffers.clear()
        self.raw.clear()

    def f64(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        """A float64 copy of `w` on the device, owned by this workspace until the next call for `slot`."""
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < w.numel():
            self.buffers.pop(slot, None)
            buf = self.buffers[slot] = torch.empty(w.numel(), dtype=torch.float64, device=self.device)
        return buf[: w.numel()].view(w.shape).copy_(w)


@contextmanager
def cpu_threads(device: torch.device, threads: int = 1):
    """On the CPU, run torch and the BLAS under numpy/scipy (ARPACK's) with `threads` threads in the block.

    The per-matrix work is many small products interleaved with ARPACK's reverse-communication loop: waking
    a second thread for each costs more than it saves. Measured on Gemma 3 270M (2 cores): torch single-
    threaded made the warm analysis 1.6x faster, and OpenBLAS single-threaded another 1.2x.
    """
    if device.type != "cpu":
        yield
        return
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

