"""GGUF files read lazily, one tensor dequantized per `get`, with Hugging Face names, shapes and values.

llama.cpp's converter renames tensors (`blk.0.attn_q.weight`), stores them in ggml order and, for some
architectures, changes their values. `GGUFWeights` undoes all of that, so that its keys and tensors equal the
state dict `transformers` builds with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`:

    model.layers.0.self_attn.q_proj.weight  (out, in) float32

Fix-ups per architecture (the same as transformers' `modeling_gguf_pytorch_utils.py` `TENSOR_PROCESSORS`):
- llama: `attn_q`/`attn_k` rows were permuted for llama.cpp's rotary layout
  (`LlamaTensorProcessor._reverse_permute_weights`); the permutation is reversed per head.
- gemma2, gemma3: every `*norm.weight` was stored as 1 + w, because these models compute x·(1 + w)
  (`Gemma2TensorProcessor`); 1 is subtracted.
- qwen2, qwen3: stored as is.

The header is parsed here rather than with `gguf.GGUFReader`, which turns every one of the 262,144
tokenizer strings of Gemma 3 into numpy views and takes about 30 s to open the 270M model; this parser skips
them and opens it in well under a second. Decoding uses the `gguf` package (`gguf.quants.dequantize`).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptWeightsError, IntruderError
from .base import Weights, file_fingerprint, require_file

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama-style blocks have one norm before the MLP; Gemma 2/3 have a norm before and after each sub-layer.
_LLAMA_BLOCK = {**_BLOCK, "ffn_norm": "post_attention_layernorm"}
_GEMMA_BLOCK = {
    **_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAMES = {"llama": _LLAMA_BLOCK, "qwen2": _LLAMA_BLOCK, "qwen3": _LLAMA_BLOCK,
                "gemma2": _GEMMA_BLOCK, "gemma3": _GEMMA_BLOCK}
# Tensors a GGUF file may carry that have no Hugging Face parameter (transformers skips them too):
# llama 3's rope scaling factors, which transformers recomputes from the config.
_NOT_WEIGHTS = {"rope_freqs.weight"}
_NAME = re.compile(r"^(?:blk\.(?P<layer>\d+)\.)?(?P<base>\w+)\.(?P<kind>weight|bias)$")

# GGUF metadata value types (gguf.GGUFValueType): struct format of the fixed-size ones; 8 string, 9 array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 64  # longer metadata arrays (tokenizer vocabularies) are skipped, not stored
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
_GGUF_MAGIC = b"GGUF"


def _gguf():
    """The optional `gguf` package, or an error that says how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise IntruderError("reading .gguf files needs the gguf package: pip install gguf") from exc
    return gguf


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor lives: its GGUF name, ggml type, numpy-order shape (out, in), byte range."""

    gguf_name: str
    ggml_type: int
    shape: tuple[int, ...]
    start: int
    n_bytes: int


class _Cursor:
    """Sequential little-endian reads from a buffer; every read past the end raises `struct.error`."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buffer):
            raise struct.error(f"a string of {n} bytes runs past the end of the file")
        text = self.buffer[self.pos:self.pos + n].tobytes().decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int):
        """One metadata value; arrays longer than `_SMALL_ARRAY` (vocabularies) are skipped: None."""
        if kind in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise struct.error(f"unknown metadata value type {kind}")
        item_kind, count = self.unpack("<IQ")
        if count <= _SMALL_ARRAY:
            return [self.value(item_kind) for _ in range(count)]
        if item_kind in _SCALAR_FORMATS:
            self.pos += count * struct.calcsize(_SCALAR_FORMATS[item_kind])
        elif item_kind == _STRING:
            for _ in range(count):
                length = self.unpack("<Q")
                self.pos += length
        else:
            for _ in range(count):
                self.value(item_kind)
        if self.pos > len(self.buffer):
            raise struct.error("a metadata array runs past the end of the file")
        return None


def _parse_header(buffer: memoryview) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    """Metadata, tensor infos (name, ggml dims ne, type, offset) and the start of the data section."""
    cursor = _Cursor(buffer)
    if buffer[:4].tobytes() != _GGUF_MAGIC:
        raise struct.error("it does not start with the GGUF magic bytes")
    version = cursor.unpack("<4xI")
    if version & 0xFFFF == 0:
        raise struct.error("it is a big-endian GGUF file, which is not supported; convert it on a "
                           "little-endian machine")
    if version not in (2, 3):
        raise struct.error(f"GGUF version {version} is not supported (only versions 2 and 3)")
    n_tensors, n_fields = cursor.unpack("<QQ")
    metadata = {}
    for _ in range(n_fields):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        if n_dims > _MAX_DIMS:
            raise struct.error(f"tensor {name!r} claims {n_dims} dimensions (ggml allows {_MAX_DIMS})")
        dims = cursor.unpack(f"<{n_dims}Q") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        ggml_type, offset = cursor.unpack("<IQ")
        infos.append((name, dims, ggml_type, offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise struct.error(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    return metadata, infos, data_start


def _hf_name(architecture: str, gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for an unknown name."""
    match = _NAME.match(gguf_name)
    if match is None:
        return None
    base, kind, layer = match["base"], match["kind"], match["layer"]
    if layer is None:
        return f"{_TOP_LEVEL[base]}.{kind}" if base in _TOP_LEVEL else None
    block = _BLOCK_NAMES[architecture]
    return f"model.layers.{layer}.{block[base]}.{kind}" if base in block else None


class GGUFWeights(Weights):
    """A `.gguf` file as Hugging Face tensors; `get` dequantizes one tensor to float32, (out, in)."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self._path = Path(path)
        self.source = str(self._path)
        require_file(self._path)
        try:
            self._map = np.memmap(self._path, dtype=np.uint8, mode="r")
            with memoryview(self._map) as buffer:
                self.metadata, raw_infos, data_start = _parse_header(buffer)
        except (struct.error, ValueError, OverflowError) as exc:
            raise CorruptWeightsError(
                f"{self._path} is not a readable GGUF file ({exc}); it may be truncated or still "
                "downloading: download it again"
            ) from exc
        self.architecture = str(self.metadata.get("general.architecture", "<missing>"))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CorruptWeightsError(
                f"{self._path}: GGUF architecture {self.architecture!r} is not supported by intruder "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); load it with transformers "
                "(AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)), save its state dict as "
                "safetensors, and analyse that directory instead"
            )
        self._tensors = self._index(gguf, raw_infos, data_start)

    def _index(self, gguf, raw_infos, data_start: int) -> dict[str, _TensorInfo]:
        """HF name -> _TensorInfo for every tensor, in file order; refuses names it cannot map."""
        tensors: dict[str, _TensorInfo] = {}
        for gguf_name, dims, ggml_type, offset in raw_infos:
            if gguf_name in _NOT_WEIGHTS:
                continue
            hf_name = _hf_name(self.architecture, gguf_name)
            if hf_name is None:
                raise CorruptWeightsError(
                    f"{self._path}: tensor {gguf_name!r} has no Hugging Face counterpart known to intruder for "
                    f"architecture {self.architecture!r}; convert the model to safetensors with transformers"
                )
            if hf_name in tensors:
                raise CorruptWeightsError(f"{self._path}: tensor {gguf_name!r} appears twice; the file is corrupt")
            tensors[hf_name] = self._locate(gguf, gguf_name, dims, ggml_type, data_start + offset)
        return tensors

    def _locate(self, gguf, gguf_name: str, dims: tuple[int, ...], ggml_type: int, start: int) -> _TensorInfo:
        """Check the type and byte range of one tensor; dims are ggml's (in, out), reversed for HF."""
        try:
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError) as exc:
            raise CorruptWeightsError(
                f"{self._path}: tensor {gguf_name!r} has unknown ggml type {ggml_type}; the file is corrupt "
                "or newer than the installed gguf package: pip install -U gguf"
            ) from exc
        if dims and dims[0] % block_size:
            raise CorruptWeightsError(
                f"{self._path}: tensor {gguf_name!r} has rows of {dims[0]} values, not a multiple of the "
                f"{block_size}-value blocks of its type; the file is corrupt"
            )
        n_bytes = math.prod(dims) // block_size * type_size
        if start + n_bytes > self._map.size:
            raise CorruptWeightsError(
                f"{self._path}: tensor {gguf_name!r} (shape {dims[::-1]}) needs bytes up to {start + n_bytes} "
                f"but the file has {self._map.size}; it is truncated: download it again"
            )
        return _TensorInfo(gguf_name, ggml_type, tuple(reversed(dims)), start, n_bytes)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._tensors:
            raise self._missing(name)
        return self._tensors[name].shape

    def get(self, name: str) -> torch.Tensor:
        """Dequantize `name`: float32 with the HF shape, e.g. q_proj (heads·head_dim, hidden)."""
        if name not in self._tensors:
            raise self._missing(name)
        info = self._tensors[name]
        values = self._fix_up(info, self._dequantize(info))
        if values.dtype != np.float32 or not (values.flags.writeable and values.flags.c_contiguous):
            values = np.array(values, dtype=np.float32, order="C")  # a read-only view of the file: copy it
        return torch.from_numpy(values)

    def _dequantize(self, info: _TensorInfo) -> np.ndarray:
        gguf = _gguf()
        kind = gguf.GGMLQuantizationType(info.ggml_type)
        if self._map is None:  # closed, then used again: map the file anew
            self._map = np.memmap(self._path, dtype=np.uint8, mode="r")
        raw = np.asarray(self._map[info.start:info.start + info.n_bytes])
        plain = {kind.F64: np.float64, kind.I8: np.int8, kind.I16: np.int16, kind.I32: np.int32,
                 kind.I64: np.int64}
        if kind in plain:
            return raw.view(plain[kind]).reshape(info.shape).astype(np.float32)
        rows = raw.reshape(*info.shape[:-1], -1) if info.shape else raw
        try:
            return gguf.quants.dequantize(rows, kind).reshape(info.shape)
        except NotImplementedError as exc:
            raise CorruptWeightsError(
                f"{self._path}: tensor {info.gguf_name!r} is stored as {kind.name}, which the installed gguf "
                "package cannot dequantize: pip install -U gguf, or convert the model to safetensors"
            ) from exc

    def _fix_up(self, info: _TensorInfo, values: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's per-architecture value changes (see the module docstring)."""
        base = info.gguf_name.split(".")[-2]
        if self.architecture == "llama" and base in ("attn_q", "attn_k"):
            return self._unpermute(info, values, self._heads(info, kv=base == "attn_k"))
        if self.architecture in ("gemma2", "gemma3") and info.gguf_name.endswith("norm.weight"):
            return values - np.float32(1.0)
        return values

    def _heads(self, info: _TensorInfo, *, kv: bool) -> int:
        """Attention heads (kv=False) or key/value heads (kv=True) from the metadata."""
        key = f"{self.architecture}.attention.head_count"
        heads = self.metadata.get(key)
        if kv and f"{key}_kv" in self.metadata:  # GGUF's rule: no head_count_kv means as many as head_count
            key = f"{key}_kv"
            heads = self.metadata[key]
        if not isinstance(heads, int) or heads <= 0:
            raise CorruptWeightsError(
                f"{self._path}: metadata {key!r} is missing or not a positive integer ({heads!r}); it is needed "
                f"to undo the row permutation of {info.gguf_name!r}. Convert the model to safetensors instead"
            )
        return heads

    def _unpermute(self, info: _TensorInfo, values: np.ndarray, heads: int) -> np.ndarray:
        """llama.cpp stored rows (head, half, i) as (head, i, half); put them back. values (rows, ...)."""
        rows = values.shape[0]
        if rows % (2 * heads):
            raise CorruptWeightsError(
                f"{self._path}: tensor {info.gguf_name!r} has {rows} rows, not a multiple of 2 × {heads} heads; "
                "the head counts in the metadata do not match the weights"
            )
        rest = values.shape[1:]
        return values.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(values.shape)

    def fingerprint(self, name: str) -> str | None:
        return file_fingerprint(self._path, name) if name in self._tensors else None

    def close(self) -> None:
        self._map = None
