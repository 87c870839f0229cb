"""Log once from training code; the points reach every destination, and none is lost.

    import trackbridge
    run = trackbridge.init(project="p", name="r", config={...}, to=["mlflow+http://…", "wandb+offline://…"])
    run.log({"loss": 0.1}, step=3)
    run.finish()

Three parts, so the training loop never waits on a tracker:
- ``log()`` on the training thread stamps the time and appends to an in-memory queue.
  That is all it does (about a microsecond).
- The spooler thread drains the queue every few milliseconds, turns the records into one
  Arrow batch, appends it to the run's spool (``trackbridge.spool``), and offers it to each
  destination's own bounded queue.
- One thread per destination sends what it is offered. A destination that fails, or
  falls more than ``backlog`` records behind, stops being fed from memory (so memory
  stays bounded) and is warned about once; the spool still holds everything. At
  ``finish()`` every destination is completed from the spool, exactly as
  ``trackbridge sync spool://SPOOL DEST`` would, within the flush timeout; one that is
  still behind is named with that command.

Identity: the run key is W&B's (``wandb:run/<project>/<id>``), so the shim's MLflow
run, a replay of its spool, and a later nightly sync of its W&B run are one MLflow run.
W&B offline destinations are written at ``finish()`` from the spool (an offline run is
uploaded by ``wandb sync`` only afterwards anyway), with the shim's id as W&B run id.
"""

from __future__ import annotations

import atexit
import collections
import getpass
import json
import numbers
import os
import random
import socket
import string
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trackbridge import schema
from trackbridge import spool as sp
from trackbridge.errors import UsageError, first_line
from trackbridge.shim_backend import Backend, warn_once
from trackbridge.trackers.wandb import common as wc

ENV_TO = "TRACKBRIDGE_TO"  # comma-separated destination URIs
ENV_SPOOL = "TRACKBRIDGE_SPOOL"  # the spool folder
DEFAULT_SPOOL = "trackbridge-spool"


def default_destinations() -> list[str]:
    """``$TRACKBRIDGE_TO`` on a cluster; on a laptop, MLflow's own default SQLite store."""
    env = os.environ.get(ENV_TO, "").strip()
    if env:
        return [u.strip() for u in env.split(",") if u.strip()]
    return [f"mlflow+sqlite:///{Path.cwd() / 'mlflow.db'}"]


def init(
    project: str | None = None,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    to: Iterable[str] | str | None = None,
    *,
    id: str | None = None,
    tags: Iterable[str] | None = None,
    group: str | None = None,
    job_type: str | None = None,
    notes: str | None = None,
    spool: str | os.PathLike[str] | None = None,
    fsync: str = "interval",
    backlog: int = 1_000_000,
    flush_timeout: float = 120.0,
) -> Run:
    """Start a run that logs to every URI in ``to`` (default: ``$TRACKBRIDGE_TO``, else a
    local SQLite MLflow store), spooling every record under ``spool`` (default
    ``$TRACKBRIDGE_SPOOL``, else ``./trackbridge-spool``)."""
    dests = [to] if isinstance(to, str) else list(to) if to is not None else default_destinations()
    return Run(
        project=project or "uncategorized",
        name=name,
        config=config,
        destinations=dests,
        run_id=id,
        tags=tags,
        group=group,
        job_type=job_type,
        notes=notes,
        spool=Path(spool or os.environ.get(ENV_SPOOL) or DEFAULT_SPOOL),
        fsync=fsync,
        backlog=backlog,
        flush_timeout=flush_timeout,
    )


class _Recorder(dict):
    """``run.config`` / ``run.summary``: a dict whose writes are recorded, nested or not."""

    def __init__(self, run: Run, kind: str) -> None:
        super().__init__()
        self._run = run
        self._kind = kind

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._run._record_tree(self._kind, (str(key),), value)

    def update(self, other: Any = (), **kw: Any) -> None:  # type: ignore[override]
        for k, v in dict(other, **kw).items():
            self[k] = v

    def __getattr__(self, key: str) -> Any:  # wandb style: run.config.lr
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


class Run:
    def __init__(
        self,
        project: str,
        name: str | None,
        config: Mapping[str, Any] | None,
        destinations: list[str],
        run_id: str | None,
        tags: Iterable[str] | None,
        group: str | None,
        job_type: str | None,
        notes: str | None,
        spool: Path,
        fsync: str,
        backlog: int,
        flush_timeout: float,
    ) -> None:
        from trackbridge.uri import parse, redact

        for uri in destinations:
            parse(uri)  # a bad URI fails here, in the caller's hands, not in a thread
        self.project = project
        self.id = run_id or "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
        self.name = name or self.id
        self.key = wc.run_key(project, self.id)
        self.dir = spool.resolve() / self.id
        self.destinations = destinations
        self.flush_timeout = flush_timeout
        self._backlog = backlog
        self._q: collections.deque[tuple[int, int | None, str, Any, Any]] = collections.deque()
        self._step = 0
        self._enqueued = 0  # records put on the queue, and written to the spool (flush_spool)
        self._spooled = 0
        self._seq = _last_seq(self.dir)
        self._lock = threading.Lock()  # config/summary/artifact records from any thread
        self._wake = threading.Event()
        self._closing = False
        self.finished = False
        now = datetime.now(UTC)
        self.start_time = now.replace(microsecond=now.microsecond // 1000 * 1000)  # MLflow keeps ms
        if (self.dir / sp.META).exists():  # a resumed run keeps its first start
            self.start_time = datetime.fromisoformat(sp.read_meta(self.dir)["start_time"])
        meta = {
            "run_key": self.key,
            "project": project,
            "run_id": self.id,
            "name": self.name,
            "group": group,
            "job_type": job_type,
            "notes": notes,
            "labels": sorted(set(tags or [])),
            "start_time": self.start_time.isoformat(),
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "destinations": [redact(u) for u in destinations],
        }
        try:
            sp.write_meta(self.dir, meta)
            self._writer = sp.SpoolWriter(self.dir, fsync=fsync)
        except OSError as e:
            raise UsageError(
                f"spool folder {self.dir}: cannot write there ({e.strerror}); pass init(spool=…) "
                f"or set ${ENV_SPOOL} to a writable folder"
            ) from e
        self._meta = meta
        self.config = _Recorder(self, "c")
        self.summary = _Recorder(self, "u")
        if config:
            self.config.update(config)
        self._backends = [Backend(self, uri) for uri in destinations]
        self._spooler = threading.Thread(target=self._spool_loop, name="trackbridge-spooler", daemon=True)
        self._spooler.start()
        atexit.register(self._at_exit)

    # -- the training thread's side

    def log(self, data: Mapping[str, Any], step: int | None = None, commit: bool = True) -> None:
        """Record values at ``step`` (default: one past the last, as ``wandb.log``). Only
        enqueues: never blocks on a tracker, never raises because one is down."""
        if step is None:
            step = self._step
        elif step > self._step:
            self._step = step
        if commit and step >= self._step:
            self._step = step + 1
        self._q.append((time.time_ns() // 1_000_000, step, "log", dict(data), None))
        self._enqueued += 1

    def define_metric(self, name: str, step_metric: str | None = None, **options: Any) -> None:
        self._put("d", name, None, {"step_metric": step_metric, **options})

    def log_artifact(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        type: str = "model",
        aliases: Iterable[str] = (),
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Copy a file or folder into the spool now (the caller may delete it next), as one
        artifact version; it reaches destinations with the run's points."""
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"log_artifact: {src} does not exist")
        files = _spool_files(src, self.dir / "files" / (name or src.name))
        self._put(
            "a",
            name or src.name,
            None,
            {
                "name": name or src.name,
                "type": type,
                "aliases": list(aliases),
                "description": description,
                "metadata": dict(metadata or {}),
                "files": [{**f, "stored": os.path.relpath(f["stored"], self.dir)} for f in files],
            },
        )

    def _record_tree(self, kind: str, path: tuple[str, ...], value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                self._record_tree(kind, (*path, str(k)), v)
        else:
            self._put(kind, json.dumps(list(path)), None, value)

    def _put(self, kind: str, key: str, step: int | None, value: Any) -> None:
        self._q.append((time.time_ns() // 1_000_000, step, kind, key, value))
        self._enqueued += 1

    def flush_spool(self, timeout: float = 30.0) -> bool:
        """Wait until everything logged so far is written to the spool (not to the
        destinations): after it returns True, a killed process loses none of it."""
        target = self._enqueued
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._spooled < target:
            if time.monotonic() > deadline or not self._spooler.is_alive():
                return False
            time.sleep(0.001)
        return True

    # -- the spooler thread

    def _spool_loop(self) -> None:
        while True:
            self._wake.wait(0.01)
            self._wake.clear()
            closing = self._closing
            try:
                self._drain()
            except Exception as e:  # never take training down; say it once
                warn_once(self, "spooler", f"could not spool some records: {first_line(e)}")
            if closing:
                return

    def _drain(self) -> None:
        """Queue → one Arrow batch. Per record this is a handful of list appends (it runs
        beside the training thread and must keep up with it): plain floats and ints skip
        the general number test."""
        batch = sp.Batch.empty()
        seqs, times, kinds, keys, steps, values, jsons = batch.lists()
        q = self._q
        seq = self._seq
        taken = 0
        while q:
            t, step, kind, a, b = q.popleft()
            taken += 1
            if kind == "log":
                for k, v in a.items():
                    seq += 1
                    tv = type(v)
                    x = float(v) if tv is float or tv is int else _number(v)
                    seqs.append(seq)
                    times.append(t)
                    keys.append(k if type(k) is str else str(k))
                    steps.append(step)
                    if x is not None:
                        kinds.append("m")
                        values.append(x)
                        jsons.append(None)
                    else:
                        kinds.append("s")
                        values.append(None)
                        jsons.append(_json(v))
            else:
                seq += 1
                batch.add(seq, t, kind, a, step, None, _json(b))
            if len(seqs) >= 65536:
                self._seq = seq
                self._write(batch)
                batch = sp.Batch.empty()
                seqs, times, kinds, keys, steps, values, jsons = batch.lists()
        self._seq = seq
        if len(batch):
            self._write(batch)
        self._spooled += taken

    def _write(self, batch: sp.Batch) -> None:
        rb = batch.to_arrow()
        try:
            self._writer.write(rb)
        except OSError as e:  # a full disk: say so once, keep training
            warn_once(self, "spool", f"cannot write the spool {self.dir}: {first_line(e)}")
            return
        for b in self._backends:
            b.offer(rb)

    # -- finishing

    def finish(self, exit_code: int = 0, timeout: float | None = None, quiet: bool = False) -> dict[str, str]:
        """Flush: spool every record, then complete each destination from the spool within
        ``timeout`` seconds. Returns destination -> "complete" or "behind: how to catch up"."""
        if self.finished:
            return {}
        self.finished = True
        status = "finished" if exit_code == 0 else "failed"
        self._put("e", "", None, {"status": status, "exit_code": exit_code})
        self._closing = True
        self._wake.set()
        self._spooler.join()
        self._writer.close()
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        for b in self._backends:
            b.close()
        out = {}
        for b in self._backends:
            b.thread.join(max(0.0, deadline - time.monotonic()))
            out[b.safe] = b.outcome()
        if not quiet:
            for dest, state in out.items():
                print(f"trackbridge: {self.name} → {dest}: {state}", file=sys.stderr)
        return out

    def _at_exit(self) -> None:
        if not self.finished:
            self.finish(exit_code=0 if sys.exc_info()[0] is None else 1)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _number(v: Any) -> float | None:
    """A metric value: Python, NumPy and one-element tensor numbers (``.item()``); not bools."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    item = getattr(v, "item", None)
    if item is not None and getattr(v, "shape", None) in ((), (1,), [1]):
        try:
            x = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else None
    return None


def _json(v: Any) -> str:
    try:
        return schema.dumps_value(v)
    except (TypeError, ValueError):
        return schema.dumps_value(str(v))  # a value JSON cannot hold is kept as its text


def _spool_files(src: Path, dest: Path) -> list[dict[str, Any]]:
    import shutil

    from trackbridge.files import sha256_file

    items = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    out = []
    for p in items:
        rel = p.name if src.is_file() else p.relative_to(src).as_posix()
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
        out.append(
            {"path": rel, "stored": str(target), "size": target.stat().st_size, "sha256": sha256_file(target)}
        )
    return out


def _last_seq(run_dir: Path) -> int:
    """A resumed run continues its record numbers."""
    if not run_dir.exists():
        return 0
    recs, _ = sp.read_records(run_dir)
    return int(recs.column("seq")[-1].as_py()) if recs.num_rows else 0


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None
