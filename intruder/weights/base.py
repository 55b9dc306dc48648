"""The reader interface every weights format implements, and tensors already in memory.

A `Weights` is a context-managed, read-only view with `keys()`, `shape(name)` and `get(name)` that loads one
tensor at a time; adapters add `low_rank_update(name)` and `changed_keys()` so that the analysis can use the
update's structure. Readers of files live beside this module, one per format.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsNotFoundError


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
        """A cheap identity of the stored bytes of `name` (file, size, mtime, ctime, inode, tensor), or None.

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


def require_file(file: Path) -> None:
    if not file.exists():
        raise WeightsNotFoundError(f"{file} does not exist; the checkpoint is incomplete: download it again")


def file_fingerprint(file: Path, name: str) -> str:
    """`path|size|mtime|ctime|inode|name`: changes whenever the file's bytes may have. The ctime is in it
    because a rewrite in place can restore the mtime (os.utime, `touch -r`, `rsync --inplace -t`), but no
    user can set the ctime back."""
    st = os.stat(file)
    return f"{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{name}"
