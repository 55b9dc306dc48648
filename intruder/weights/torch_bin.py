"""PyTorch `.bin`/`.pt` checkpoints, read with `torch.load(weights_only=True)`: no pickled code runs."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CorruptWeightsError
from .base import Weights, file_fingerprint, require_file


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
            require_file(file)
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
        return None if file is None else file_fingerprint(file, name)

    def close(self) -> None:
        self._open.clear()
