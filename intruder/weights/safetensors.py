"""Safetensors files, single or sharded, read with plain `readinto` one tensor at a time; and the small
whole-file read and write the cache and the adapters use."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptWeightsError, WeightsNotFoundError
from .base import Weights, file_fingerprint, require_file


class SafetensorsWeights(Weights):
    """One or more safetensors files, read with plain `readinto` one tensor at a time.

    Reading into fresh memory, rather than through a memory map as `safe_open` does, keeps the process's
    resident memory at the tensors in use: pages of a mapped multi-GB file would stay counted until the
    mapping is garbage-collected.
    """

    def __init__(self, files: list[Path], source: str):
        self.source = source
        self._entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}  # the first file's `__metadata__`
        for file in files:
            entries, metadata = _read_header(file)
            self._entries.update(entries)
            self.metadata = self.metadata or metadata

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._entries:
            raise self._missing(name)
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        if name not in self._entries:
            raise self._missing(name)
        return self._entries[name].dtype

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, read into `out` when given (a reusable buffer of its size), else new memory."""
        if name not in self._entries:
            raise self._missing(name)
        e = self._entries[name]
        if out is None:
            out = torch.empty(e.shape, dtype=e.dtype)
        else:
            out = out[: math.prod(e.shape)].view(e.shape)
        if e.nbytes == 0:  # a 0-element tensor (e.g. a rank-0 LoRA factor): nothing to read
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(e.file, "rb") as f:
            f.seek(e.start)
            got = f.readinto(view)
        if got != e.nbytes:
            raise CorruptWeightsError(f"{e.file} ends inside tensor {name!r} (read {got} of {e.nbytes} bytes); "
                                      "the file is truncated: download it again")
        return out

    def fingerprint(self, name: str) -> str | None:
        e = self._entries.get(name)
        return None if e is None else file_fingerprint(e.file, name)


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_header(file: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse a safetensors header (8-byte little-endian length, JSON) and check every entry fits the file."""
    require_file(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        text = f.read(n) if 0 <= n <= 100_000_000 else b""
    return _parse_header(file, head, text, file.stat().st_size, _DOWNLOAD_AGAIN)


_DOWNLOAD_AGAIN = "it may be truncated or still downloading: download it again"


def _parse_header(file: Path, head: bytes, text: bytes, size: int, advice: str
                  ) -> tuple[dict[str, _Entry], dict[str, str]]:
    def corrupt(why: str) -> CorruptWeightsError:
        return CorruptWeightsError(f"{file} is not a readable safetensors file ({why}); {advice}")

    if len(head) < 8:
        raise corrupt(f"only {size} bytes")
    n = int.from_bytes(head, "little")
    if n > size - 8 or len(text) != n:
        raise corrupt(f"header length {n} exceeds the file size {size}")
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise corrupt(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise corrupt(f"bad entry for tensor {name!r}: {info}") from exc
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or 8 + n + end > size:
            raise corrupt(f"tensor {name!r} {list(shape)} {info['dtype']} needs bytes {begin}..{end} past the "
                          f"{size - 8 - n}-byte data section")
        entries[name] = _Entry(file, dtype, shape, 8 + n + begin, nbytes)
    metadata = header.get("__metadata__") or {}
    return entries, metadata if isinstance(metadata, dict) else {}


def read_safetensors(file: Path, *, advice: str = "it is truncated or damaged: replace it with an intact copy",
                     buffer=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a small safetensors file and its metadata, with one open and one read.

    advice: what a CorruptWeightsError about a damaged `file` tells the reader to do (the caller knows what
    the file is: a cache entry is recomputed, a run's checkpoint written again).
    buffer: None, or a function of a byte count returning a reusable bytearray at least that long to read into;
    the tensors are then views into it, valid until it is reused.
    """
    if not file.is_file():
        raise WeightsNotFoundError(f"{file} does not exist")
    size = file.stat().st_size
    data = bytearray(size) if buffer is None else memoryview(buffer(size))[:size]
    with open(file, "rb") as f:
        got = f.readinto(data)
    n = int.from_bytes(data[:8], "little") if got >= 8 else -1
    text = bytes(data[8 : 8 + n]) if 0 <= n <= got - 8 else b""
    entries, metadata = _parse_header(file, bytes(data[:8]) if got >= 8 else b"", text, got, advice)
    tensors = {}
    for name, e in entries.items():
        # a view of the one buffer; files this package writes are 8-byte aligned, others are copied when not
        chunk = data if e.start % e.dtype.itemsize == 0 else bytearray(data[e.start : e.start + e.nbytes])
        offset = e.start if chunk is data else 0
        count = e.nbytes // e.dtype.itemsize
        if count == 0:
            tensors[name] = torch.empty(e.shape, dtype=e.dtype)
        else:
            tensors[name] = torch.frombuffer(chunk, dtype=e.dtype, count=count, offset=offset).reshape(e.shape)
    return tensors, metadata


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write CPU tensors as safetensors straight from their memory (no serialised copy)."""
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # tensor data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
