"""One lock file per factor-cache entry, so that processes sharing a cache (the ranks of one job, jobs on one
shared file system) compute each entry once.

`<entry>.lock` is created with O_CREAT | O_EXCL, which exactly one process wins, also on NFS (v3 and later);
it holds "host pid" of its holder. While a process holds locks, a daemon thread touches them every
`HEARTBEAT` seconds. Another process waiting for an entry treats its lock as stale, removes it and takes over,
when the holder is a process of this host that no longer runs, or when the lock file has not changed for
`stale_after` seconds of the waiter's own clock (so clocks that differ between machines do not matter): a
killed rank's lock blocks the others for at most that long. Two waiters that break the same stale lock at
once may both compute the entry; the entry is written atomically, so that costs time, never correctness.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT = 10.0  # seconds between touches of every lock this process holds
STALE_AFTER = 120.0  # a lock unchanged for this long (waiter's clock) belongs to a process that is gone
_HELD: set[Path] = set()  # the lock files this process holds
_GUARD = threading.Lock()
_HOST = socket.gethostname()
_beating: threading.Thread | None = None


def acquire(lock: Path) -> bool:
    """Try once to take `lock` for this process: True when it holds it now, False when another holds it (or
    this process already does). True also when no lock can be made there (a read-only cache)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return True
    try:
        os.write(fd, f"{_HOST} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    with _GUARD:
        _HELD.add(lock)
    _start_heartbeat()
    return True


def release(lock: Path) -> None:
    """Remove `lock` if this process holds it; nothing otherwise."""
    with _GUARD:
        held = lock in _HELD
        _HELD.discard(lock)
    if held:
        lock.unlink(missing_ok=True)


def holds(lock: Path) -> bool:
    """Whether this process holds `lock`."""
    with _GUARD:
        return lock in _HELD


def holder(lock: Path) -> str:
    """Who holds `lock`, as written in it ("host pid"), for messages; "" when unreadable or gone."""
    try:
        return lock.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


class Waiter:
    """One process waiting for another's lock: polls, and says when the lock is stale."""

    def __init__(self, lock: Path, stale_after: float = STALE_AFTER):
        self.lock, self.stale_after = lock, stale_after
        self.since = time.monotonic()
        self.signature = self._signature()
        self.delay = 0.01

    def sleep(self) -> None:
        """Wait a little longer each time (10 ms, growing by half, at most 0.25 s: a few stats a second)."""
        time.sleep(self.delay)
        self.delay = min(1.5 * self.delay, 0.25)

    def stale(self) -> bool:
        """Whether the lock's holder is gone: a dead process of this host, or no heartbeat for `stale_after`."""
        signature = self._signature()
        if signature != self.signature:  # touched, replaced or removed: its holder is alive (or it is free)
            self.signature, self.since = signature, time.monotonic()
        if signature is None:
            return False
        if self._holder_gone():
            return True
        return time.monotonic() - self.since > self.stale_after

    def break_lock(self) -> None:
        """Remove the stale lock so that a new holder can take it."""
        self.lock.unlink(missing_ok=True)
        self.signature, self.since = None, time.monotonic()

    def _signature(self):
        try:
            st = os.stat(self.lock)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _holder_gone(self) -> bool:
        host, _, pid = holder(self.lock).partition(" ")
        if host != _HOST or not pid.isdigit():
            return False
        if int(pid) == os.getpid():  # ours on record but not held: left by an earlier process of this pid
            return not holds(self.lock)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, but another user's
            return False
        return False


def _start_heartbeat() -> None:
    global _beating
    with _GUARD:
        if _beating is not None and _beating.is_alive():
            return
        _beating = threading.Thread(target=_beat, name="intruder-cache-heartbeat", daemon=True)
        _beating.start()


def _beat() -> None:
    """Touch every held lock every HEARTBEAT seconds, so that waiters see its holder is alive."""
    while True:
        time.sleep(HEARTBEAT)
        with _GUARD:
            locks = list(_HELD)
        for lock in locks:
            try:
                os.utime(lock)
            except OSError:
                pass


@atexit.register
def _release_all() -> None:
    with _GUARD:
        locks = list(_HELD)
        _HELD.clear()
    for lock in locks:
        lock.unlink(missing_ok=True)
