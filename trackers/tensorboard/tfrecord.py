"""TFRecord framing, the container of TensorBoard's event files: each record is its
length (8 bytes, little-endian), the masked CRC-32C of those 8 bytes, the data, and the
masked CRC-32C of the data.

TensorBoard's own loader checks the checksums in pure Python, which is most of its time;
here they are checked by ``google-crc32c``'s C code over the file read at once. Event
files are untrusted input: a length that runs past the end is a cut-off file (a killed
job), which gives every whole record before it; a checksum that does not match is an
error naming the file and the byte where the record starts.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trackbridge.errors import BadInputError, MissingExtraError

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")


def _crc32c():
    try:
        import google_crc32c
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise MissingExtraError("tensorboard", "google-crc32c") from e
    if google_crc32c.implementation != "c":  # pragma: no cover - a build without its C code
        raise MissingExtraError("tensorboard", "google-crc32c (its C build)")
    return google_crc32c.value


def masked(crc: int) -> int:
    """The checksum as TFRecord stores it: rotated and offset, so that a CRC of data
    that holds CRCs does not degenerate."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


@dataclass
class Records:
    """The whole records of one file, and where it stopped."""

    path: Path
    data: bytes
    records: list[bytes] = field(default_factory=list)  # each record's data, checked
    truncated_at: int | None = None  # the byte where a cut-off record starts

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.records)


def read_records(path: Path) -> Records:
    """Every whole record of ``path``, its checksums checked."""
    crc = _crc32c()
    data = path.read_bytes()
    out = Records(path, data)
    pos, size = 0, len(data)
    header = _HEADER.unpack_from
    records = out.records
    while pos < size:
        if size - pos < 12:
            out.truncated_at = pos
            break
        length, length_crc = header(data, pos)
        if masked(crc(data[pos : pos + 8])) != length_crc:
            raise BadInputError(f"{path}: byte {pos}: record length checksum mismatch (the file is corrupt)")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > size:
            out.truncated_at = pos
            break
        (data_crc,) = struct.unpack_from("<I", data, end)
        record = data[start:end]
        if masked(crc(record)) != data_crc:
            raise BadInputError(f"{path}: byte {pos}: record checksum mismatch (the file is corrupt)")
        records.append(record)
        pos = end + 4
    return out
