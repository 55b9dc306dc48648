"""Hugging Face hub ids: recognising one, downloading it, and a clear error when the hub is out of reach."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import IntruderError, OfflineError, WeightsNotFoundError

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID_PATTERN.match(text)) and not text.startswith((".", "/", "~"))


def download(repo_id: str, *, repo_type: str = "model",
             patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.bin", "*.gguf"),
             local_path: Path | None = None) -> Path:
    """Snapshot a hub repository's files matching `patterns`; a clear `OfflineError` when that is impossible.

    local_path: the local path the caller looked for first and did not find (a hub id is also a valid
        relative path, and `fx/basee` is more often a mistyped folder than a model); errors then say so.
    """
    first = "" if local_path is None else f"no local path {_shown(local_path)}, and "
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise IntruderError(f"{first}{repo_id!r} looks like a hub id; install huggingface_hub to download it"
                            ) from exc
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=list(patterns)))
    except LocalEntryNotFoundError as exc:
        raise OfflineError(
            f"{first}{repo_id!r} cannot be downloaded as a hub {repo_type}: the hub is unreachable (offline, "
            "or HF_HUB_OFFLINE is set) and it is not in the local Hugging Face cache; check the path's "
            "spelling, pass a local directory, or download it where there is a network"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise WeightsNotFoundError(
            f"{first}{repo_id!r} is no hub {repo_type} repository you can access; check the spelling of the "
            "path or id, or log in with `huggingface-cli login`"
        ) from exc
    except OSError as exc:
        raise OfflineError(f"{first}{repo_id!r} cannot be downloaded as a hub {repo_type} ({exc}); check the "
                           "path's spelling, or pass a local directory") from exc


def _shown(path: Path) -> str:
    """The path as given, and where a relative one was looked for."""
    return str(path) if path.is_absolute() else f"{path} (relative to {Path.cwd()})"
