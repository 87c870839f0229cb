"""Read the record log inside a W&B ``run-*.wandb`` file.

The SDK lost its Python reader in 0.30, so we read the framing ourselves. It is LevelDB's
log format with W&B's own 7-byte file header (``:W&B``, 0xBEE1, version 0): 32 KiB
blocks of records, each with a 7-byte header (CRC32 of type byte + data, length, type)
and a FULL payload or one split into FIRST, MIDDLE… and LAST pieces. Each payload is a
``wandb_internal_pb2.Record``.

What can go wrong decides what we do, because a run log is often all a user has:
- The file ends inside a record (a preempted or crashed job): every whole record is
  still good, so we yield them and set ``truncated``; the caller marks the run incomplete.
- A checksum fails in the middle of the file: the bytes are damaged, and anything we
  guessed past that point could be wrong, so it is an error naming the file and offset.
  A bad checksum on the very last record, with only zeros after it, is a torn final
  write, which is the same thing as a truncation.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from trackbridge.errors import BadInputError

IDENT = b":W&B"
MAGIC = 0xBEE1
VERSION = 0
BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}
_HDR = struct.Struct("<IHB")


class RecordLog:
    """Iterate the payloads of one ``.wandb`` file; check ``truncated`` afterwards."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.truncated = False
        self.size = 0

    def _fail(self, offset: int, why: str) -> BadInputError:
        return BadInputError(f"{self.path}: byte {offset}: {why}")

    def payloads(self) -> Iterator[tuple[int, bytes]]:
        """Yield (offset of the record's first piece, payload bytes)."""
        with open(self.path, "rb") as fh:
            self.size = os.fstat(fh.fileno()).st_size
            if self.size == 0:
                self.truncated = True
                return
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                yield from self._scan(mm)

    def _scan(self, data: mmap.mmap) -> Iterator[tuple[int, bytes]]:
        size = self.size
        if size < HEADER:
            self.truncated = True
            return
        ident, magic, version = struct.unpack_from("<4sHB", data, 0)
        if ident != IDENT or magic != MAGIC:
            raise self._fail(0, "not a W&B run file (bad header)")
        if version != VERSION:
            raise self._fail(0, f"W&B log format version {version} is not supported (only {VERSION})")
        pos = HEADER
        parts: list[bytes] = []
        start = pos
        unpack = _HDR.unpack_from
        crc32 = zlib.crc32
        while True:
            left = BLOCK - pos % BLOCK
            if left < HEADER:
                pos += left  # block trailer: zero padding
            if pos + HEADER > size:
                if (pos < size and any(data[pos:size])) or parts:
                    self.truncated = True
                return
            crc, length, kind = unpack(data, pos)
            if kind == 0 and not any(data[pos:size]):
                # only zeros left: space the writer reserved but never filled
                self.truncated = bool(parts)
                return
            end = pos + HEADER + length
            if end > pos - pos % BLOCK + BLOCK:
                # the writer splits records at block ends: a length past one is damage
                raise self._fail(pos, f"record length {length} runs past its block (the file is damaged)")
            if end > size:
                self.truncated = True
                return
            piece = data[pos + HEADER : end]
            # the checksum covers the type byte too: a damaged type is a checksum failure,
            # an unknown type with a good checksum is a format this reader does not know
            if crc32(piece, _TYPE_CRC[kind] if kind in _TYPE_CRC else crc32(bytes([kind]))) != crc:
                if end >= size or not any(data[end:size]):
                    self.truncated = True  # a torn final write
                    return
                raise self._fail(pos, "record checksum mismatch (the file is damaged)")
            if kind not in _TYPE_CRC:
                raise self._fail(pos, f"unknown record type {kind}")
            if kind == FULL:
                if parts:
                    raise self._fail(pos, "a whole record interrupts a split one")
                yield pos, piece
            elif kind == FIRST:
                if parts:
                    raise self._fail(pos, "a new split record starts before the last one ended")
                start = pos
                parts = [piece]
            else:
                if not parts:
                    raise self._fail(pos, "a record continuation has no start")
                parts.append(piece)
                if kind == LAST:
                    yield start, b"".join(parts)
                    parts = []
            pos = end
