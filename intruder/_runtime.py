"""How the analysis runs on a machine: torch threads, reused buffers, the heap, reading ahead.

None of this changes a result; it is here so that `intruders.py` reads as the mathematics.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .spectra import BaseFactors, FactorCache
from .weights import SafetensorsWeights, Weights


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
    already mapped avoids page-faulting a fresh allocation per matrix (a third of the time of a read)."""

    def __init__(self, device: torch.device, threads: int):
        self.device, self.threads = device, threads  # threads: for the base decompositions
        self.buffers: dict[int, torch.Tensor] = {}  # float64, per slot
        self.raw: dict[tuple[torch.dtype, int], torch.Tensor] = {}  # read buffers, per stored dtype and slot

    def read(self, weights: Weights, name: str, slot: int) -> torch.Tensor:
        """`weights.get(name)`, into a reused buffer where the reader supports it (safetensors)."""
        if not isinstance(weights, SafetensorsWeights):
            return weights.get(name)
        numel, dtype = math.prod(weights.shape(name)), weights.dtype(name)
        buf = self.raw.get((dtype, slot))
        if buf is None or buf.numel() < numel:
            self.raw.pop((dtype, slot), None)  # release the old buffer before growing
            buf = self.raw[dtype, slot] = torch.empty(numel, dtype=dtype)
        return weights.get(name, out=buf)

    def f64(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        """A float64 copy of `w` on the device, owned by this workspace until the next call for `slot`."""
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < w.numel():
            self.buffers.pop(slot, None)
            buf = self.buffers[slot] = torch.empty(w.numel(), dtype=torch.float64, device=self.device)
        return buf[: w.numel()].view(w.shape).copy_(w)


@dataclass
class Fetched:
    """A base matrix as read: `raw` (stored dtype, in a read buffer), its cache `key`, cached `factors`."""

    name: str
    raw: torch.Tensor
    key: str | None
    factors: BaseFactors | None


def stream_base(base: Weights, names: list[str], cache: FactorCache | None, work: Workspace) -> Iterator[Fetched]:
    """Read the base matrices in order. While the caller analyses a matrix whose factors came from the cache
    (a warm run, where reading is a third of the time), the next one is read on a second thread; a cold run
    reads in turn, keeping memory for the decomposition."""

    def fetch(i: int) -> Fetched:
        raw = work.read(base, names[i], slot=i % 2)
        key = cache.key(raw, base.fingerprint(names[i])) if cache is not None else None
        factors = cache.load(key, tuple(raw.shape)) if cache is not None else None
        return Fetched(names[i], raw, key, factors)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="intruder-read") as pool:
        ahead = pool.submit(fetch, 0) if names else None
        for i in range(len(names)):
            item = ahead.result()
            last = i + 1 == len(names)
            ahead = pool.submit(fetch, i + 1) if item.factors is not None and not last else None
            yield item
            if ahead is None and not last:
                ahead = pool.submit(fetch, i + 1)


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
