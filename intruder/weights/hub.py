"""Hugging Face hub ids: recognising one, downloading it, and a clear error when the hub is out of reach."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import IntruderError, OfflineError, WeightsNotFoundError

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID_PATTERN.match(text)) and not text.startswith((".", "/", "~"))


def download(repo_id: str, *, repo_type: str = "model",
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
