"""The common event, decoded for many records at once: one scalar summary, as
``add_scalar`` writes it in a training loop.

Its bytes have one shape (protobuf's encoding of ``Event{wall_time, step,
summary{value{tag, simple_value}}}``, fields in number order, as every writer emits
them)::

    09 <wall_time: 8>  [10 <step: varint>]  2a <n>  0a <n>  0a <n> <tag>  15 <value: 4>

(``step`` is left out when it is 0.) Records of one length are checked against that
shape a byte column at a time, and their fields read out as columns; any record that
differs in the least (a second value, metadata, a long tag, another kind of summary)
is left to TensorBoard's protobuf classes, record by record, so nothing is decoded
differently from what those classes would give.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

_SHORT = 128  # longer records (a very long tag) are left to protobuf


@dataclass
class Scalars:
    """The records that were plain scalar events, and their fields."""

    index: np.ndarray  # int64: which records
    keys: pa.Array  # string
    steps: np.ndarray  # int64
    times_us: np.ndarray  # int64
    values: np.ndarray  # float32, as the file holds them


def decode(records: Any) -> Scalars:
    """The plain scalar events among ``records`` (``tfrecord.Records``)."""
    parts: list[tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    lengths = records.lengths
    for length in np.unique(lengths[(lengths >= 20) & (lengths <= _SHORT)]).tolist():
        idx, rows = records.rows(length)
        parts += _of_length(idx, rows, length)
    if not parts:
        empty = np.zeros(0, np.int64)
        return Scalars(empty, pa.array([], pa.string()), empty, empty, np.zeros(0, np.float32))
    index = np.concatenate([p[0] for p in parts])
    names: list[str] = []
    codes = []
    for p in parts:
        codes.append(p[2] + len(names))
        names += p[1]
    keys = pa.DictionaryArray.from_arrays(
        pa.array(np.concatenate(codes), pa.int32()), pa.array(names, pa.string())
    )
    return Scalars(
        index,
        keys.cast(pa.string()),
        np.concatenate([p[3] for p in parts]),
        np.concatenate([p[4] for p in parts]),
        np.concatenate([p[5] for p in parts]),
    )


def _of_length(idx: np.ndarray, rows: np.ndarray, length: int) -> list[tuple]:
    n = len(rows)
    ok = (rows[:, 0] == 0x09) & (rows[:, length - 5] == 0x15)
    # the step: absent (0), or a varint of 1 to 10 bytes from byte 10
    has_step = rows[:, 9] == 0x10
    ok &= has_step | (rows[:, 9] == 0x2A)
    width = min(10, length - 10)
    cols = rows[:, 10 : 10 + width]
    ends = cols < 0x80
    step_len = np.where(ends.any(axis=1), ends.argmax(axis=1) + 1, 99)
    step_len = np.where(has_step, step_len, 0)
    longest = int(step_len[step_len <= width].max(initial=0))
    acc = np.zeros(n, dtype=np.uint64)
    for j in range(longest):  # only as many bytes as the longest step has
        part = (cols[:, j].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * j)
        acc |= np.where(step_len > j, part, np.uint64(0))
    step = acc.view(np.int64)
    ok &= step_len <= width
    # then summary, value and tag, each a one-byte length that must end with the record
    p = np.where(has_step, 10 + step_len, 9)
    p = np.minimum(p, length - 11)  # a bad row only: keeps the look-ups inside the row
    r = np.arange(n)

    def at(off: int) -> np.ndarray:
        return rows[r, np.clip(p + off, 0, length - 1)].astype(np.int64)

    tag_len = length - 5 - (p + 6)
    ok &= (at(0) == 0x2A) & (at(1) == length - p - 2)
    ok &= (at(2) == 0x0A) & (at(3) == length - p - 4)
    ok &= (at(4) == 0x0A) & (at(5) == tag_len) & (tag_len >= 0) & (tag_len < 0x80)
    out = []
    for start in np.unique(p[ok]).tolist():
        sel = np.flatnonzero(ok & (p == start))
        tl = length - 5 - (start + 6)
        if tl:
            uniq, inverse = _distinct(np.ascontiguousarray(rows[sel, start + 6 : start + 6 + tl]))
        else:  # an empty tag
            uniq, inverse = [b""], np.zeros(len(sel), np.int64)
        try:
            names = [bytes(u).decode("utf-8") for u in uniq]
        except UnicodeDecodeError:
            continue  # protobuf decides what such a tag is
        wall = np.ascontiguousarray(rows[sel, 1:9]).view("<f8").ravel()
        value = np.ascontiguousarray(rows[sel, length - 4 : length]).view("<f4").ravel()
        out.append(
            (idx[sel], names, inverse.astype(np.int64), step[sel], (wall * 1_000_000).astype(np.int64), value)
        )
    return out


def _fnv(tags: np.ndarray) -> np.ndarray:
    """A 64-bit FNV-1a hash of each row, a few vector passes over the columns."""
    h = np.full(len(tags), 14695981039346656037, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(tags.shape[1]):
            h = (h ^ tags[:, j].astype(np.uint64)) * np.uint64(1099511628211)
    return h


def _distinct(
    tags: np.ndarray, hashed: Callable[[np.ndarray], np.ndarray] = _fnv
) -> tuple[list[bytes], np.ndarray]:
    """The distinct rows of a 2-D uint8 array and each row's place among them: by a
    64-bit hash of each row (where sorting the rows themselves is slow), every row then
    compared with its distinct row, and by sorting the rows after all if two ever shared
    a hash (``hashed`` is replaceable so that a test can make them share one)."""
    _, first, inverse = np.unique(hashed(tags), return_index=True, return_inverse=True)
    if (tags == tags[first][inverse]).all():
        return [tags[i].tobytes() for i in first], inverse
    uniq, inverse = np.unique(tags.view(f"V{tags.shape[1]}").ravel(), return_inverse=True)
    return [bytes(u) for u in uniq], inverse
