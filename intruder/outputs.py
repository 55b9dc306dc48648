"""How the package writes what it produces, and where its caches live.

Every file is written beside its place and renamed in (`atomic_write`, `write_text`, `atomic_dir`), so that a
failure (disk full, Ctrl-C) leaves either the old content or the new one, never a half-written file, and
nothing a user had is removed before its replacement exists. `versions()` records what produced an output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache_dir() -> Path:
    """$INTRUDER_CACHE, else $XDG_CACHE_HOME/intruder, else ~/.cache/intruder."""
    if os.environ.get("INTRUDER_CACHE"):
        return Path(os.environ["INTRUDER_CACHE"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "intruder"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Let `write` fill a temporary file beside `path`, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`path.write_text(text)`, atomically (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class atomic_dir:
    """`with atomic_dir(path) as tmp:` fill `tmp`; on success it replaces `path`, on error it vanishes.

    The old `path`, if any, is moved aside before the rename and removed only after the new one is in place.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)
        return False


def versions(packages=("torch", "numpy", "scipy", "safetensors", "transformers", "matplotlib")) -> dict[str, str]:
    """Versions of Python, the platform, intruder and `packages`, for run summaries and reports."""
    import importlib.metadata
    import platform

    from . import __version__

    found = {"python": platform.python_version(), "platform": platform.platform(), "intruder": __version__}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
