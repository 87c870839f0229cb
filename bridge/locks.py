"""Cross-process locks: the only thing that keeps two trackbridge processes on one machine
from both creating the same store, the same run or the same model version.

All of them are ``flock`` locks. The kernel drops one when its holder dies, however it
dies, so a ``kill -9`` never leaves a lock that blocks the next run, and no lock file has
to be cleaned up. They are advisory: they order trackbridge processes, which is all they
need to do. Two machines that share no lock still cannot duplicate a run in MLflow: the
importer also looks for the run by its source key just before and just after creating
it (``trackbridge.claims``).

Never lock an SQLite database file itself: SQLite's own locks are POSIX record locks,
which a process loses when it closes *any* descriptor of the file. These helpers lock
the folder that holds the file, or a lock file of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from trackbridge.errors import DestinationError, UsageError


@contextlib.contextmanager
def folder_lock(folder: str | Path, timeout: float = 600.0) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` itself, waiting up to ``timeout`` seconds.

    For critical sections that are short (create a store, look a run up and create it):
    a second process waits for the first instead of failing. A folder that cannot be
    opened (no read permission) is not locked; what happens inside then fails with its
    own, clearer error.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        _acquire(fd, fcntl.LOCK_EX, timeout, str(folder))
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on a lock file (created if need be), waiting for another
    holder for ``timeout`` seconds, or for as long as it lives (None)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        _acquire(fd, fcntl.LOCK_EX, timeout, str(path))
        yield
    finally:
        os.close(fd)


def _acquire(fd: int, kind: int, timeout: float | None, what: str) -> None:
    if timeout is None:
        fcntl.flock(fd, kind)
        return
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DestinationError(
                    f"{what}: still locked by another trackbridge process after {timeout:.0f} s"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def try_lock(path: Path, shared: bool = False) -> int | None:
    """Open (creating) ``path`` and lock it without waiting: its descriptor, or None if
    another process holds it. Closing the descriptor releases the lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def host_lock_dir() -> Path:
    """A folder of this user's, shared by every trackbridge process of theirs on this
    machine, whatever state folder each uses: ``$XDG_RUNTIME_DIR/trackbridge`` or
    ``$TMPDIR/trackbridge-<uid>``. A shared temporary folder is checked to be our own and
    private first, so another user cannot plant a link there."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "trackbridge" if runtime and os.path.isdir(runtime) else None
    if base is None:
        base = Path(tempfile.gettempdir()) / f"trackbridge-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError as e:
        raise UsageError(f"lock folder {base}: cannot create it ({e.strerror})") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise UsageError(
            f"lock folder {base}: not a private folder of this user; remove it or set XDG_RUNTIME_DIR"
        )
    locks = base / "locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    return locks


def host_lock_path(identity: str) -> Path:
    """The lock file of one identity (a normalised sync pair), in ``host_lock_dir``."""
    return host_lock_dir() / (hashlib.sha256(identity.encode()).hexdigest()[:32] + ".lock")
