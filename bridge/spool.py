"""The shim's local spool: every record a training run logs, in Arrow IPC, on local disk.

The spool is the shim's source of truth. Backends are fed from what was spooled, and
``trackbridge sync spool://PATH DEST`` replays a spool into any destination, so a
backend that was down, slow, or killed with the process is completed later, exactly.

Layout: ``PATH/<run id>/meta.json`` (the run's fixed fields, written when it starts)
and ``PATH/<run id>/records-N.arrow`` (an Arrow IPC stream per process that logged to
the run: a resumed run adds a file), plus ``files/`` for logged artifacts' bytes.

A record is one row: ``seq`` (order within the run), ``time`` (ms precision, so MLflow
keeps it exactly), ``kind``, ``key``, ``step``, ``value`` (numbers) and ``json`` (the
rest). Kinds: ``m`` metric, ``s`` non-numeric series value, ``c`` config and ``u``
summary (``key`` is the JSON path), ``a`` artifact, ``d`` define_metric, ``e`` end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from trackbridge.errors import BadInputError, first_line
from trackbridge.files import atomic_write_bytes

FORMAT = 1
META = "meta.json"
RECORDS = "records-{n}.arrow"
SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("time", pa.timestamp("ms", tz="UTC")),
        ("kind", pa.string()),
        ("key", pa.string()),
        ("step", pa.int64()),
        ("value", pa.float64()),
        ("json", pa.string()),
    ]
)
FSYNC_POLICIES = ("never", "batch", "interval")


@dataclass
class Batch:
    """Records as columns, the way the spooler collects them."""

    seq: list[int]
    time: list[int]
    kind: list[str]
    key: list[str | None]
    step: list[int | None]
    value: list[float | None]
    json: list[str | None]

    @classmethod
    def empty(cls) -> Batch:
        return cls([], [], [], [], [], [], [])

    def lists(self) -> tuple[list, ...]:
        """The column lists, for a writer that appends to them directly (the spooler)."""
        return self.seq, self.time, self.kind, self.key, self.step, self.value, self.json

    def __len__(self) -> int:
        return len(self.seq)

    def add(
        self,
        seq: int,
        t_ms: int,
        kind: str,
        key: str | None,
        step: int | None,
        value: float | None,
        js: str | None,
    ) -> None:
        self.seq.append(seq)
        self.time.append(t_ms)
        self.kind.append(kind)
        self.key.append(key)
        self.step.append(step)
        self.value.append(value)
        self.json.append(js)

    def to_arrow(self) -> pa.RecordBatch:
        return pa.record_batch(
            [
                pa.array(self.seq, pa.int64()),
                pa.array(self.time, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
                pa.array(self.kind, pa.string()),
                pa.array(self.key, pa.string()),
                pa.array(self.step, pa.int64()),
                pa.array(self.value, pa.float64()),
                pa.array(self.json, pa.string()),
            ],
            schema=SCHEMA,
        )


class SpoolWriter:
    """Appends record batches to this process's stream file of one run.

    ``fsync``: ``never`` leaves flushing to the OS (a killed process loses nothing
    written; a power cut may), ``batch`` fsyncs every batch, ``interval`` at most once a
    second. Every batch is written with one ``write`` call through an unbuffered file,
    so what ``write`` returned is in the kernel even if the process is killed next.
    """

    def __init__(self, run_dir: Path, fsync: str = "interval") -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        n = 0
        while (run_dir / RECORDS.format(n=n)).exists():
            n += 1
        self.path = run_dir / RECORDS.format(n=n)
        self._file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - closed in close()
        self._writer = pa.ipc.new_stream(self._file, SCHEMA)
        self.fsync = fsync
        self._synced = time.monotonic()

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        if self.fsync == "batch" or (self.fsync == "interval" and time.monotonic() - self._synced >= 1.0):
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        self._writer.close()
        if self.fsync != "never":
            os.fsync(self._file.fileno())
        self._file.close()


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / META, json.dumps({"format": FORMAT, **meta}, indent=1, default=str).encode())


def read_meta(run_dir: Path) -> dict[str, Any]:
    p = run_dir / META
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{p}: not a readable spool run ({first_line(e)})") from e
    if meta.get("format") != FORMAT:
        raise BadInputError(f"{p}: spool format {meta.get('format')!r}; this trackbridge reads {FORMAT}")
    return meta


def record_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("records-*.arrow"), key=lambda p: int(p.stem.split("-")[1]))


def read_records(run_dir: Path) -> tuple[pa.Table, list[str]]:
    """Every whole batch of the run, in ``seq`` order, and notes for any cut-short file
    (a process killed in the middle of a write leaves a partial last batch)."""
    batches: list[pa.RecordBatch] = []
    notes = []
    for f in record_files(run_dir):
        try:
            reader = pa.ipc.open_stream(pa.OSFile(str(f)))
        except (pa.ArrowInvalid, OSError) as e:
            if f.stat().st_size == 0:
                continue  # created, never written: the process died at once
            raise BadInputError(f"{f}: not an Arrow IPC stream ({first_line(e)})") from e
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError):
                notes.append(
                    f"{f} ends inside a batch (the process was killed while writing); "
                    "every whole batch was read"
                )
                break
    tbl = pa.Table.from_batches(batches, schema=SCHEMA) if batches else SCHEMA.empty_table()
    seq = tbl.column("seq")
    if len(seq) > 1 and not pc.all(pc.greater(seq.slice(1), seq.slice(0, len(seq) - 1))).as_py():
        tbl = tbl.sort_by("seq")  # one writer appends in order: a copy only when it did not
    return tbl, notes
