"""How the package writes what it produces, and where its caches live.

Every file is written beside its place and renamed in (`atomic_write`, `write_text`, `atomic_dir`), so that a
failure (disk full, Ctrl-C) leaves either the old content or the new one, never a half-written file, and
nothing a user had is removed before its replacement exists. `check_output_file` and `check_output_dir` refuse
a path that cannot be written before any work is done. `versions()` records what produced an output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import IntruderError


def default_cache_dir() -> Path:
    """$INTRUDER_CACHE, else $XDG_CACHE_HOME/intruder, else ~/.cache/intruder."""
    if os.environ.get("INTRUDER_CACHE"):
        return Path(os.environ["INTRUDER_CACHE"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "intruder"


def check_output_file(path: str | os.PathLike) -> Path:
    """`path`, if a file can be written there; else an IntruderError saying why (a directory, a parent that is a
    file, a folder without write permission). Call it before the work whose result goes there."""
    path = Path(path)
    if path.is_dir():
        raise IntruderError(f"output file {path} is a directory: name a file to write, e.g. "
                            f"{path / ('report' + (path.suffix or '.json'))}")
    _check_writable_under(path.parent, path)
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """`path`, if it is a directory, or can be created as one, that files can be written into; else an
    IntruderError saying why. Call it before the work whose results go there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IntruderError(f"output directory {path} is a file, not a directory: choose a new or existing "
                            "directory")
    _check_writable_under(path, path)
    return path


def _check_writable_under(folder: Path, path: Path) -> None:
    """Refuse `path` when the nearest existing folder of `folder` (itself or an ancestor) is a file or not
    writable: nothing could be created below it."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise IntruderError(f"cannot write {path}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise IntruderError(f"cannot write {path}: no permission to write in {existing}; choose a directory you "
                            "can write to")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Let `write` fill a temporary file beside `path`, flush it to disk, then rename it into place. The file
    gets the permissions of the one it replaces, else those a plain `open` would give (0666 less the umask),
    not the temporary file's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))
    finally:
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


def _mode_for(path: Path) -> int:
    """The permission bits for a new file at `path`: those of the file there now, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    try:  # Linux says the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


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
