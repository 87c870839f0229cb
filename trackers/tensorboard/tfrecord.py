"""TFRecord framing, the container of TensorBoard's event files: each record is its
length (8 bytes, little-endian), the masked CRC-32C of those 8 bytes, the data, and the
masked CRC-32C of the data.

TensorBoard's own loader checks the checksums in pure Python, a record at a time, which
is most of its time. Here the file is read at once, the records' places found in one
pass over their lengths, and the checksums of the many short records (a scalar event is
about 30 bytes) computed together, a byte column at a time over all records of one
length (numpy, from CRC-32C's table); a long record (an image) goes to ``google-crc32c``.

Event files are untrusted input: a length that runs past the end is a cut-off file (a
killed job), which gives every whole record before it; a checksum that does not match is
an error naming the file and the byte where the record starts, the first such in the
file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from trackbridge.errors import BadInputError, MissingExtraError

_MASK_DELTA = 0xA282EAD8
_SHORT = 128  # records up to this long are checked together, by columns...
_MANY = 32  # ...when there are at least this many of one length
_LENGTH = struct.Struct("<Q")


def _table() -> np.ndarray:
    """CRC-32C's byte table (Castagnoli polynomial, reflected: 0x82F63B78)."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    return t


_TABLE = _table()


def _crc32c():  # the C function, imported when it is first needed
    try:
        import google_crc32c
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise MissingExtraError("tensorboard", "google-crc32c") from e
    return google_crc32c.value


def masked(crc: int) -> int:
    """The checksum as TFRecord stores it: rotated and offset, so that a CRC of data
    that holds CRCs does not degenerate."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _masked(crc: np.ndarray) -> np.ndarray:
    return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(_MASK_DELTA)


def crc_columns(rows: np.ndarray) -> np.ndarray:
    """The CRC-32C of each row of a 2-D uint8 array."""
    crc = np.full(len(rows), 0xFFFFFFFF, dtype=np.uint32)
    for j in range(rows.shape[1]):
        crc = _TABLE[(crc ^ rows[:, j]) & np.uint32(0xFF)] ^ (crc >> np.uint32(8))
    return crc ^ np.uint32(0xFFFFFFFF)


def _gather(buf: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """``width`` bytes from each offset in ``at``, as rows: a window view of the buffer
    (no copy) indexed by the offsets, so only the rows themselves are copied."""
    if len(buf) < width:
        return np.zeros((0, width), dtype=np.uint8)
    return np.lib.stride_tricks.sliding_window_view(buf, width)[at]


@dataclass
class Records:
    """The whole records of one file: where each one's data starts and how long it is."""

    path: Path
    data: bytes
    starts: np.ndarray  # int64: the byte where each record's data starts
    lengths: np.ndarray  # int64
    truncated_at: int | None = None  # the byte where a cut-off record starts
    # the records of one length, checked by columns: their places and their bytes as
    # rows, kept for the decoders that read them by columns too
    by_length: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def rows(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The records of ``length``: which they are, and their bytes as rows."""
        if length not in self.by_length:
            idx = np.flatnonzero(self.lengths == length)
            self.by_length[length] = (idx, _gather(self.buf, self.starts[idx], length))
        return self.by_length[length]

    @property
    def buf(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.starts)

    def record(self, i: int) -> bytes:
        s = int(self.starts[i])
        return self.data[s : s + int(self.lengths[i])]

    def __iter__(self) -> Iterator[bytes]:
        return (self.record(i) for i in range(len(self)))


def _walk(data: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each record's header starts and its data's length, following the lengths
    from the start; and where the walk stopped (a cut-off record, or the end).

    A writer's records often have one length many times over (one tag, steps of one
    width): from a record of length n, the lengths at every n + 16 bytes are read at
    once (a strided view, no copy) and as many as still say n are taken together. Where
    lengths change often, records are stepped through one by one for a while."""
    size, unpack = len(data), _LENGTH.unpack_from
    heads: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    one_h: list[int] = []
    one_n: list[int] = []
    pos, window = 0, 16
    while pos + 12 <= size:
        (n,) = unpack(data, pos)
        if n > size - pos - 16:
            break
        step = n + 16
        m = min(window, (size - pos) // step)  # records of length n that would fit whole
        j = 1
        if m > 1:
            said = np.ndarray((m,), dtype="<u8", buffer=data, offset=pos, strides=(step,))
            same = said == n
            j = m if same.all() else int(same.argmin())
        if j >= 4:
            heads.append(pos + step * np.arange(j, dtype=np.int64))
            lengths.append(np.full(j, n, dtype=np.int64))
            pos += j * step
            window = min(window * 2, 1 << 16) if j == m else 16
            continue
        window = 16
        for _ in range(32):  # lengths that change often: one record at a time
            one_h.append(pos)
            one_n.append(n)
            pos += n + 16
            if pos + 12 > size:
                break
            (n,) = unpack(data, pos)
            if n > size - pos - 16:
                break
    heads.append(np.array(one_h, dtype=np.int64))
    lengths.append(np.array(one_n, dtype=np.int64))
    h, n = np.concatenate(heads), np.concatenate(lengths)
    order = np.argsort(h, kind="stable")
    return h[order], n[order], pos


def read_records(path: Path) -> Records:
    """Every whole record of ``path``, both checksums of each checked."""
    data = path.read_bytes()
    heads, lengths, pos = _walk(data)
    size = len(data)
    out = Records(path, data, heads + 12, lengths)
    if pos < size:
        # a header whose length is itself damaged would look like a cut: its checksum tells
        if (
            pos + 12 <= size
            and masked(_crc32c()(data[pos : pos + 8])) != struct.unpack_from("<I", data, pos + 8)[0]
        ):
            heads = np.append(heads, pos)
        else:
            out.truncated_at = pos
    _check(out, heads)
    return out


def _check(out: Records, heads: np.ndarray) -> None:
    """Raise at the first record, in file order, whose length or data checksum fails."""
    if not len(heads):
        return
    buf = out.buf
    bad = np.flatnonzero(
        _masked(crc_columns(_gather(buf, heads, 8))) != _gather(buf, heads + 8, 4).copy().view("<u4").ravel()
    )
    first_bad_length = int(heads[bad[0]]) if len(bad) else None
    n = len(out.starts)
    bad_data: list[int] = []
    if n:
        stored = _gather(buf, out.starts + out.lengths, 4).copy().view("<u4").ravel()
        lengths, counts = np.unique(out.lengths, return_counts=True)
        by_columns = (lengths <= _SHORT) & (counts >= _MANY)
        for length in lengths[by_columns].tolist():
            idx, rows = out.rows(length)
            got = _masked(crc_columns(rows))
            bad_data += idx[got != stored[idx]].tolist()
        crc = _crc32c()
        one_by_one = ~np.isin(out.lengths, lengths[by_columns])
        for i in np.flatnonzero(one_by_one).tolist():
            if masked(crc(out.record(i))) != int(stored[i]):
                bad_data.append(i)
    first_bad_data = int(out.starts[min(bad_data)]) - 12 if bad_data else None
    if first_bad_length is not None and (first_bad_data is None or first_bad_length <= first_bad_data):
        raise BadInputError(
            f"{out.path}: byte {first_bad_length}: record length checksum mismatch (the file is corrupt)"
        )
    if first_bad_data is not None:
        raise BadInputError(
            f"{out.path}: byte {first_bad_data}: record checksum mismatch (the file is corrupt)"
        )
