"""Where a training run writes: `out` made ready for a new run, and put back as it was if the run fails
before its first epoch is saved (an overwritten run is moved aside, and deleted only once the new one has an
epoch)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import suppress
from pathlib import Path

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "state.pt")
# what a run writes in its folder, and the temporaries each is written through (`.state.pt.tmp-123`, ...)
_WRITTEN = re.compile(r"^\.?(config\.json|metrics\.jsonl|summary\.json|state\.pt|epoch-\d+)(\..*)?$")


class RunDirectory:
    """`with RunDirectory(out, new=True) as run:` an empty `out` for a new run inside the block.

    A run that `out` already holds is first moved aside. Until `run.keep()` (called once an epoch is saved), a
    failure or Ctrl-C puts everything back: the folders this call created are removed, an empty folder that
    was there is emptied of the run's files only, and the run moved aside returns. After `keep()`, or at the
    end, the run moved aside is deleted. With new=False (resuming) `out` is used as it is.
    """

    def __init__(self, out: Path, *, new: bool):
        self.out, self.new = out, new
        self.aside: Path | None = None  # the replaced run, until keep()
        self.created: list[Path] = []  # folders this call made, deepest first
        self.kept = not new

    def __enter__(self) -> RunDirectory:
        if self.new and holds_run(self.out):
            self.aside = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.replaced-", dir=self.out.parent))
            os.replace(self.out, self.aside)
        if self.new:
            missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
            self.out.mkdir(parents=True, exist_ok=True)
            self.created = missing
        return self

    def keep(self) -> None:
        """The new run has a finished epoch: keep it whatever happens next, and delete the run it replaces."""
        self.kept = True
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or self.kept:
            self.keep()
            return False
        if self.created:
            shutil.rmtree(self.out, ignore_errors=True)
            for folder in self.created[1:]:  # parents made for `out`, if nothing else was put there
                with suppress(OSError):
                    folder.rmdir()
        else:  # `out` was an empty folder: take out what the run wrote, nothing else
            for child in self.out.iterdir():
                if _WRITTEN.match(child.name):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        if self.aside is not None:
            os.replace(self.aside, self.out)
        return False


def holds_run(out: Path) -> bool:
    """Whether the folder `out` holds a training run's files."""
    return out.is_dir() and any((out / f).exists() for f in RUN_FILES)
