"""One lazy reader for model weights, whatever the format underneath.

`open_weights(source)` returns a `Weights`: a context-managed, read-only view with `keys()`, `shape(name)`
and `get(name)`, which loads one tensor at a time. Sources: a Hugging Face model directory (single or sharded
safetensors, or `.bin` read with `weights_only=True`), a single `.safetensors`/`.bin`/`.pt`/`.gguf` file, a
hub id, a state dict, an `nn.Module`, or a PEFT LoRA adapter directory (merged on the fly over its base).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptWeightsError, IntruderError, OfflineError, WeightsNotFoundError


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = left @ right, scale already folded in: left (out, r), right (r, in), float64."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        return self.left @ self.right


class Weights:
    """A lazy, read-only view of one model's tensors; `get` loads one tensor at a time.

    Subclasses implement `keys`, `shape` and `get`. Adapters also implement `low_rank_update` and
    `changed_keys`, so that the analysis can use the update's structure and skip what did not change.
    """

    source: str = "<weights>"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self, name: str) -> str | None:
        """A cheap identity of the stored bytes of `name` (file, size, mtime, tensor), or None.

        The factor cache uses it to remember a tensor's content hash without rehashing unchanged files.
        """
        return None

    def low_rank_update(self, name: str) -> LowRankUpdate | None:
        """The update ΔW of `name` as low-rank factors when the source knows them (a LoRA adapter)."""
        return None

    def changed_keys(self) -> set[str] | None:
        """The tensors that differ from the base, when the source knows (an adapter); None if unknown."""
        return None

    def close(self) -> None:
        pass

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self.keys())} tensors)"

    def _missing(self, name: str) -> WeightsNotFoundError:
        return WeightsNotFoundError(
            f"tensor {name!r} is not in {self.source}; it has {len(self.keys())} tensors, "
            f"e.g. {', '.join(self.keys()[:3])}"
        )


class StateDictWeights(Weights):
    """A state dict or an `nn.Module`, already in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str = "<state dict>"):
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        self.source = source

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._tensors:
            raise self._missing(name)
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise self._missing(name)
        return self._tensors[name].detach()


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
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(e.file, "rb") as f:
            f.seek(e.start)
            got = f.readinto(view)
        if got != e.nbytes:
            raise CorruptWeightsError(f"{e.file} ends inside tensor {name!r} (read {got} of {e.nbytes} bytes); "
                                      "the file is truncated: download it again")
        return out

    def fingerprint(self, name: str) -> str | None:
        e = self._entries.get(name)
        return None if e is None else _file_fingerprint(e.file, name)


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
    _require_file(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        text = f.read(n) if 0 <= n <= 100_000_000 else b""
    return _parse_header(file, head, text, file.stat().st_size)


def _parse_header(file: Path, head: bytes, text: bytes, size: int) -> tuple[dict[str, _Entry], dict[str, str]]:
    def corrupt(why: str) -> CorruptWeightsError:
        return CorruptWeightsError(f"{file} is not a readable safetensors file ({why}); it may be truncated "
                                   "or still downloading: download it again")

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


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a small safetensors file and its metadata, with one open and one read."""
    _require_file(file)
    size = file.stat().st_size
    data = bytearray(size)
    with open(file, "rb") as f:
        got = f.readinto(data)
    n = int.from_bytes(data[:8], "little") if got >= 8 else -1
    text = bytes(data[8 : 8 + n]) if 0 <= n <= got - 8 else b""
    entries, metadata = _parse_header(file, bytes(data[:8]) if got >= 8 else b"", text, got)
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


class TorchBinWeights(Weights):
    """`.bin`/`.pt` checkpoints, read with `torch.load(weights_only=True, mmap=True)`."""

    def __init__(self, files: list[Path], source: str):
        self.source = source
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._open: dict[Path, dict] = {}
        for file in files:
            for key, tensor in self._load(file).items():
                self._where[key] = file
                self._shapes[key] = tuple(tensor.shape)

    def _load(self, file: Path) -> dict:
        if file not in self._open:
            _require_file(file)
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CorruptWeightsError(
                    f"cannot read {file} as a PyTorch checkpoint with weights_only=True ({exc}); "
                    "it may be truncated, or hold pickled code: re-save it as safetensors"
                ) from exc
            if not isinstance(state, dict):
                raise CorruptWeightsError(f"{file} holds a {type(state).__name__}, not a state dict")
            self._open[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._open[file]

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise self._missing(name)
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise self._missing(name)
        return self._load(self._where[name])[name].clone()

    def fingerprint(self, name: str) -> str | None:
        file = self._where.get(name)
        return None if file is None else _file_fingerprint(file, name)

    def close(self) -> None:
        self._open.clear()


def open_weights(source, *, base=None) -> Weights:
    """Open `source` lazily; pass the result to `find_intruders`, or read tensors with `get`.

    source: a `Weights`, a state dict, an `nn.Module`, a path (model directory, adapter directory,
        `.safetensors`, `.bin`, `.pt` or `.gguf` file) or a Hugging Face hub id.
    base: for a PEFT adapter, the model it was trained on (anything `open_weights` accepts); defaults to
        the adapter config's `base_model_name_or_path`.
    """
    if isinstance(source, Weights):
        return source
    if isinstance(source, torch.nn.Module):
        return StateDictWeights(source.state_dict(), source=f"<{type(source).__name__}>")
    if isinstance(source, Mapping):
        return StateDictWeights(source)
    if not isinstance(source, (str, os.PathLike)):
        raise IntruderError(
            f"cannot open weights from a {type(source).__name__}; pass a path, a hub id, a state dict "
            "or an nn.Module"
        )
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_hub_id(str(source)):
            path = _download(str(source))
        else:
            raise WeightsNotFoundError(f"{path} does not exist: pass an existing model directory or file")
    if path.is_dir() and (path / "adapter_config.json").exists():
        from .adapters import AdapterWeights

        return AdapterWeights(path, base=base)
    return _open_path(path)


def _open_path(path: Path) -> Weights:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return SafetensorsWeights([path], source=str(path))
        if suffix in (".bin", ".pt", ".pth"):
            return TorchBinWeights([path], source=str(path))
        if suffix == ".gguf":
            from ._gguf import GGUFWeights

            return GGUFWeights(path)
        raise CorruptWeightsError(
            f"{path}: unknown weights format {suffix!r}; expected .safetensors, .bin, .pt or .gguf"
        )
    files = _shard_files(path, "model.safetensors")
    if files:
        return SafetensorsWeights(files, source=str(path))
    files = _shard_files(path, "pytorch_model.bin")
    if files:
        return TorchBinWeights(files, source=str(path))
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return SafetensorsWeights(loose, source=str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _open_path(ggufs[0])
    present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise WeightsNotFoundError(
        f"{path} holds no model weights (found: {present}); expected model.safetensors, a sharded "
        "model.safetensors.index.json, pytorch_model.bin, a .gguf file, or adapter_config.json"
    )


def _shard_files(directory: Path, single: str) -> list[Path]:
    """[directory/single], or the shards an `<single>.index.json` names, or []."""
    if (directory / single).exists():
        return [directory / single]
    index = directory / f"{single}.index.json"
    if not index.exists():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptWeightsError(f"{index} is not a valid shard index (needs a 'weight_map')") from exc
    return [directory / name for name in dict.fromkeys(weight_map.values())]


def _require_file(file: Path) -> None:
    if not file.exists():
        raise WeightsNotFoundError(f"{file} does not exist; the checkpoint is incomplete: download it again")


def _file_fingerprint(file: Path, name: str) -> str:
    st = os.stat(file)
    return f"{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{name}"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def _download(repo_id: str, *, repo_type: str = "model",
              patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.bin", "*.gguf")) -> Path:
    """Snapshot a hub repository's files matching `patterns`; a clear `OfflineError` when that is impossible."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise IntruderError(f"{repo_id!r} looks like a hub id; install huggingface_hub to download it") from exc
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=list(patterns)))
    except LocalEntryNotFoundError as exc:
        raise OfflineError(
            f"cannot download {repo_id!r}: the hub is unreachable (offline, or HF_HUB_OFFLINE is set) and "
            "it is not in the local Hugging Face cache; download it where there is a network, or pass a "
            "local directory"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} is neither a local path nor a hub repository you can access; check the spelling "
            "or log in with `huggingface-cli login`"
        ) from exc
    except OSError as exc:
        raise OfflineError(f"cannot download {repo_id!r} ({exc}); pass a local directory instead") from exc
