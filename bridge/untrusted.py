"""The checks that make a bundle safe to read: a bundle is untrusted input.

A bundle may come from anyone (a colleague, a backup, a download), so nothing read from
it is followed before it is checked: a blob's place is derived only from a real SHA-256
digest, no symbolic link inside the bundle is followed, every marker has the shape its
readers rely on, and a blob's bytes reach an importer only through ``verified_blob``,
which hashes them as they stream and refuses a mismatch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trackbridge import schema
from trackbridge.errors import BadInputError
from trackbridge.files import CHUNK, current_umask, safe_relpath

UNIT_KINDS = ("project", "run", "artifact", "registry")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def readable_version(value: object) -> bool:
    """A schema version this trackbridge reads (a crafted one may be any JSON value)."""
    return type(value) is int and value in schema.READABLE_SCHEMA_VERSIONS


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def blob_relpath(sha256: str, where: str = "bundle") -> str:
    """Where a blob lives: derived from its digest alone, and only from a real one (64
    lower-case hex digits); a bundle is untrusted input, and ``../../etc/passwd`` is not
    a digest."""
    if not is_digest(sha256):
        raise BadInputError(f"{where}: {str(sha256)[:80]!r} is not a SHA-256 digest (64 hex digits)")
    return f"blobs/sha256/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def check_manifest(path: Path, body: dict[str, Any]) -> None:
    """The manifest's own fields have the types its readers rely on (its numbers are
    compared with the units' by ``BundleSource.check``)."""
    counts = body.get("counts", {})
    ok = (
        isinstance(counts, dict)
        and all(isinstance(k, str) and type(v) is int for k, v in counts.items())
        and isinstance(body.get("blobs", {}), dict)
        and isinstance(body.get("checksums", {}), dict)
        and isinstance(body.get("source", ""), str | None)
    )
    if not ok:
        raise BadInputError(f"{path}: counts, blobs, checksums or source have the wrong type")


def check_marker(p: Path, m: Any) -> None:
    """A marker is untrusted like everything else in a bundle: every field that names a
    file or a blob must have the shape that makes it safe to follow."""

    def bad(what: str) -> BadInputError:
        return BadInputError(f"{p}: {what}")

    if not isinstance(m, dict):
        raise bad("not a unit marker (expected a JSON object)")
    if not readable_version(m.get("schema_version")):
        raise bad(f"unit schema version {m.get('schema_version')!r} is not supported")
    if m.get("kind") not in UNIT_KINDS or not isinstance(m.get("key"), str):
        raise bad(f"unknown unit kind {m.get('kind')!r} or a key that is not text")
    tables = m.get("tables")
    if not isinstance(tables, dict):
        raise bad("'tables' is not an object")
    for name, e in tables.items():
        if name not in schema.SCHEMAS:
            raise bad(f"unknown table {name!r}")
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and type(e.get("rows")) is int):
            raise bad(f"table {name!r}: expected file, rows and sha256")
        if not is_digest(e.get("sha256")):
            raise bad(f"table {name!r}: {str(e.get('sha256'))[:80]!r} is not a SHA-256 digest")
        safe_relpath(e["file"], str(p))
    blobs = m.get("blobs", [])
    if not isinstance(blobs, list):
        raise bad("'blobs' is not a list")
    for b in blobs:
        blob_relpath(b, str(p))


def inside(root: Path, rel: str, where: str) -> Path:
    """``root/rel``, refusing any symbolic link on the way: a bundle's files are its own,
    and a link would let it name any file on the host."""
    path = root
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return root / rel
        if stat.S_ISLNK(st.st_mode):
            raise BadInputError(f"{path}: is a symbolic link; a bundle must hold its own files ({where})")
    return path


def check_blob(root: Path, sha256: str, where: str, into: Path | None = None) -> None:
    """Hash one blob as it is read (copying it into ``into`` too, if given) and fail on a
    mismatch. The blob is opened without following a link and must be a regular file of
    the bundle; the error names the blob and ``where`` it is used."""
    p = inside(root, blob_relpath(sha256, where), where)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise BadInputError(f"{p}: blob missing from the bundle ({where})") from None
    except OSError as e:
        raise BadInputError(f"{p}: cannot read this blob ({e.strerror}; {where})") from None
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as fin, open(into, "wb") if into else contextlib.nullcontext() as fout:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise BadInputError(f"{p}: not a regular file ({where})")
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            if fout is not None:
                fout.write(chunk)
    if h.hexdigest() != sha256:
        raise BadInputError(
            f"{p}: corrupt blob, its content hashes to {h.hexdigest()[:16]}… ({where}); re-export the bundle"
        )


@contextlib.contextmanager
def verified_blob(root: Path, sha256: str, name: str, where: str) -> Iterator[str]:
    """The bytes of one blob, checked against its digest as they are read: streamed once
    into a private temporary file (named like the file it is, as importers name what they
    upload) while hashed, and handed out only if the digest matches. What the importer
    uploads is then exactly what was checked, with no second read, and nothing can swap
    the file in between."""
    with tempfile.TemporaryDirectory(prefix="trackbridge-blob-") as d:
        out = Path(d) / (os.path.basename(name) or "blob")
        check_blob(root, sha256, where, into=out)
        os.chmod(out, 0o666 & ~current_umask())
        yield str(out)
