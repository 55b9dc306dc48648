"""The weights wing: one lazy reader per format, and `open_weights`, the one dispatcher on top of them.

`open_weights(source)` returns a `Weights`: a context-managed, read-only view with `keys()`, `shape(name)`
and `get(name)`, which loads one tensor at a time. Sources: a Hugging Face model directory (single or sharded
safetensors, or `.bin` read with `weights_only=True`), a single `.safetensors`/`.bin`/`.pt`/`.gguf` file, a
hub id, a state dict, an `nn.Module`, or a PEFT LoRA adapter directory (merged on the fly over its base).
Readers know nothing of the analysis.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CorruptWeightsError, IntruderError, WeightsNotFoundError
from .base import LowRankUpdate, StateDictWeights, Weights
from .hub import download, looks_like_hub_id
from .safetensors import SafetensorsWeights
from .torch_bin import TorchBinWeights

__all__ = ["open_weights", "Weights", "LowRankUpdate", "StateDictWeights", "SafetensorsWeights", "TorchBinWeights"]


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
        if looks_like_hub_id(str(source)):
            path = download(str(source), local_path=path)
        else:
            raise WeightsNotFoundError(f"{path} does not exist: pass an existing model directory or file")
    if path.is_dir() and (path / "adapter_config.json").exists():
        from .peft import AdapterWeights

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
            from .gguf import GGUFWeights

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
