"""File helpers that every part of trackbridge needs the same way.

Atomic writes (temporary file, fsync, rename) are what make a bundle crash-safe, and
``safe_relpath`` is the single gate that stops an artifact path from escaping its folder,
whichever tracker the path came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from trackbridge.errors import BadInputError

CHUNK = 1 << 20


def safe_relpath(path: str, where: str) -> str:
    """Return ``path`` normalised, or fail if it is absolute or climbs out with ``..``."""
    if not path or "\x00" in path:
        raise BadInputError(f"{where}: empty or invalid artifact path {path!r}")
    p = path.replace("\\", "/")
    norm = posixpath.normpath(p)
    if p.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
        raise BadInputError(f"{where}: artifact path {path!r} escapes its folder")
    return norm


def _read_umask() -> int:
    """The process's umask: from /proc where the kernel shows it, since reading it with
    ``os.umask`` means setting it, which other threads creating files could see."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # at import, before any worker thread exists
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def current_umask() -> int:
    return _UMASK


def _as_umask_allows(fd: int) -> None:
    """A temporary file is made 0600; the file it becomes gets the mode any new file of
    the user gets (0644 under the usual umask), as a copy made with ``cp`` would."""
    os.fchmod(fd, 0o666 & ~current_umask())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def bytes_fetch(data: bytes) -> Callable[[], AbstractContextManager[str]]:
    """``FileRef.fetch`` for bytes a source holds in memory (a file inside a log, an
    image inside an event): written to a temporary file only while it is read."""

    @contextmanager
    def fetch() -> Iterator[str]:
        fd, name = tempfile.mkstemp(prefix="trackbridge-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            yield name
        finally:
            os.unlink(name)

    return fetch


def local_fetch(path: Path) -> Callable[[], AbstractContextManager[str]]:
    """``FileRef.fetch`` for a file already on local disk: no copy, just a check that it
    is still there when its turn comes."""

    @contextmanager
    def fetch() -> Iterator[str]:
        if not path.exists():
            raise BadInputError(f"{path}: the file disappeared while reading")
        yield str(path)

    return fetch


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    _as_umask_allows(fd)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with _ignore_missing():
            os.unlink(tmp)
        raise


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def copy_hashed(src: str | Path, dest_dir: Path) -> tuple[Path, str, int]:
    """Copy ``src`` into ``dest_dir`` under a temporary name, hashing as it streams."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(prefix=".blob.", suffix=".tmp", dir=dest_dir)
    _as_umask_allows(fd)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        with _ignore_missing():
            os.unlink(tmp)
        raise
    return Path(tmp), h.hexdigest(), size


@contextmanager
def owned_temp_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder that is removed afterwards, and also when its process was
    killed: the folder holds a lock file its owner keeps locked, and the next user of
    the same prefix removes every folder whose lock nobody holds any more."""
    from trackbridge.locks import try_lock

    remove_stale(prefix)
    d = Path(tempfile.mkdtemp(prefix=prefix))
    fd = try_lock(d / OWNER_LOCK)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        if fd is not None:
            os.close(fd)


OWNER_LOCK = ".owner.lock"


def remove_stale(prefix: str, grace: float = 300.0) -> list[Path]:
    """Remove this user's ``prefix*`` temporary folders whose owner died (its lock is
    free); a folder with no lock file yet is left alone for ``grace`` seconds."""
    import time

    from trackbridge.locks import try_lock

    gone = []
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue  # not a folder of ours (a link, another user's)
        lock = d / OWNER_LOCK
        if not lock.exists():
            if time.time() - st.st_mtime < grace:
                continue
        else:
            try:
                fd = try_lock(lock)
            except OSError:
                continue
            if fd is None:
                continue  # its owner is alive
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


@contextmanager
def temp_dir(prefix: str = "trackbridge-") -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _ignore_missing() -> contextlib.suppress:
    return contextlib.suppress(FileNotFoundError)


def download_fetch(download: Callable[[str], str]) -> Callable[[], AbstractContextManager[str]]:
    """A ``FileRef.fetch`` for bytes that must be downloaded: ``download(folder)`` puts
    the file in a temporary folder and returns its path; the folder goes when the caller
    is done, so only one file at a time sits on local disk."""

    @contextmanager
    def fetch() -> Iterator[str]:
        with temp_dir() as d:
            yield download(str(d))

    return fetch
