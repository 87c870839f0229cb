"""The nightly sync: copy what is new or changed from a source into a destination.

It is ``engine.copy`` with a plan (``SyncPlan``) that makes it incremental, plus the
things a job that runs unattended every night needs: a lock, filters and naming from a
config file, sharding, a dated delta bundle of what moved, and one report.

Where the state lives, and why a lost cache costs nothing:
- **Identity and "already synced" live in the destination.** Every run trackbridge
  wrote carries its source key, a completion marker and the source's change token
  (``trackbridge.source_token``). The sync reads that index once per experiment (one
  paged search) and skips every run whose listed token matches, without reading it.
- **The state folder** holds only what can be rebuilt: the lock, the runs a filter left
  out (so an excluded run is not re-read every night; delete it and they are read once
  more, then remembered again), the delta bundles, and the history of syncs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from trackbridge import engine
from trackbridge.errors import TrackbridgeError, UsageError
from trackbridge.locks import host_lock_path, try_lock
from trackbridge.model import (
    LABELS,
    STATUS,
    TOKEN,
    UPDATED,
    IncrementalSink,
    RunPayload,
    Selection,
)
from trackbridge.report import Report, RunReport, scrub
from trackbridge.sync_config import (
    Filters,
    Options,
    Pair,
    check_template,
    default_state_dir,
    experiment_name,
    load_config,
    parse_shard,
    parse_when,
    slug,
)
from trackbridge.uri import redact

# the config's names are the sync's own: ``trackbridge.sync.Pair`` and friends
__all__ = [
    "Filters",
    "Options",
    "Pair",
    "check_template",
    "default_state_dir",
    "load_config",
    "parse_shard",
    "parse_when",
    "prune_deltas",
    "shard_of",
    "sync_pair",
]


class LockedError(TrackbridgeError):
    """Another sync of the same pair holds the lock."""

    exit_code = 75  # EX_TEMPFAIL: try again later


# -- configuration


# -- the state folder

_STATE_SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS filtered (run_key TEXT PRIMARY KEY, token TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS history (started TEXT, finished TEXT, summary TEXT);
"""


class State:
    """One pair's state folder: its lock, remembered filter decisions and history."""

    def __init__(self, root: Path, pair: Pair, shard: tuple[int, int] | None = None) -> None:
        # each shard its own lock: the N shards of one pair run at the same time
        self.dir = root / (pair.pair_id + (f"-shard{shard[0]}of{shard[1]}" if shard else ""))
        self.identity = pair.identity
        self.shard = shard
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"state folder {self.dir}: cannot create it ({e.strerror})") from e
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the pair's locks for the whole sync.

        OS file locks (flock): the kernel releases one when its holder dies, however it
        dies, so a lock left by a killed sync never blocks the next one. Two locks: one
        in the state folder, and one keyed on the pair's canonical identity in a folder
        every process of this user on this machine shares, so two syncs of one pair
        exclude each other whatever their spelling or state folder. A shard holds the
        pair's lock shared and its own shard's exclusively: the shards of one pair run
        together, and none of them beside an unsharded sync of the pair. The lock file's
        text only says who holds it, for the error message.
        """
        shard = f" shard {self.shard[0]}/{self.shard[1]}" if self.shard else ""
        wanted = [(host_lock_path(self.identity), bool(self.shard))]
        if self.shard:
            wanted.append((host_lock_path(self.identity + shard), False))
        wanted.append((self.dir / "lock", False))
        fds: list[int] = []
        try:
            for path, shared in wanted:
                fd = try_lock(path, shared=shared)
                if fd is None:
                    holder = path.read_text(errors="replace").strip() if path.exists() else ""
                    raise LockedError(
                        f"another sync of this pair is running ({holder or 'unknown'}); lock {path}"
                    )
                fds.append(fd)
                if not shared:
                    os.ftruncate(fd, 0)
                    stamp = datetime.now(UTC).isoformat(timespec="seconds")
                    text = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}{shard}\n"
                    os.pwrite(fd, text.encode(), 0)
            yield
        finally:
            for fd in fds:
                os.close(fd)  # releases the lock

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            path = self.dir / "state.sqlite"
            try:
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                db.executescript(_STATE_SCHEMA)
            except sqlite3.DatabaseError:
                # only a cache: a damaged one is rebuilt, not fatal (once: a folder we
                # cannot write then fails with its own error instead of looping)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                db.executescript(_STATE_SCHEMA)
            self._db = db
        return self._db

    def filtered(self, run_key: str, token: str) -> str | None:
        """Why the run was left out, if it was, with this very token (and filters)."""
        with self._lock:
            row = self.db.execute("SELECT token, reason FROM filtered WHERE run_key=?", (run_key,)).fetchone()
        return row[1] if row and row[0] == token else None

    def remember_filtered(self, run_key: str, token: str | None, reason: str | None) -> None:
        with self._lock:
            if token is None or reason is None:
                self.db.execute("DELETE FROM filtered WHERE run_key=?", (run_key,))
            else:
                self.db.execute("INSERT OR REPLACE INTO filtered VALUES (?, ?, ?)", (run_key, token, reason))

    def record(self, started: datetime, report: Report) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO history VALUES (?, ?, ?)",
                (started.isoformat(), datetime.now(UTC).isoformat(), json.dumps(report.to_json()["summary"])),
            )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# -- the plan


class SyncPlan(engine.Plan):
    def __init__(self, pair: Pair, opts: Options, state: State, source: Any, sink: Any) -> None:
        self.pair, self.opts, self.state, self.source, self.sink = pair, opts, state, source, sink
        self._names: dict[str, str] = {}
        self._synced: dict[str, dict[str, tuple[str | None, str]]] = {}
        self._lock = threading.Lock()
        self._read_to_decide: set[str] = set()
        # A remembered "left out" holds only for the filters that decided it: change the
        # tags or states in the config, and every run is judged again.
        f = pair.filters
        self._sig = hashlib.sha256(repr((f.tags, f.exclude_tags, f.states)).encode()).hexdigest()[:12]

    def project(self, row: dict[str, Any]) -> dict[str, Any]:
        if not self.pair.experiment:
            return row
        name = experiment_name(self.pair.experiment, row)
        other = self._names.setdefault(name, row["project_key"])
        if other != row["project_key"]:
            raise UsageError(
                f"pair {self.pair.name}: experiment template {self.pair.experiment!r} names two projects "
                f"{name!r}; include {{project}} in it"
            )
        return {**row, "name": name}

    def select(self, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.opts.shard:
            k, n = self.opts.shard
            roots = _family_roots(runs)
            runs = [r for r in runs if shard_of(roots[r["run_key"]], n) == k - 1]
        return runs

    def skip(self, row: dict[str, Any]) -> tuple[str, str | None] | None:
        token = row.get(TOKEN)
        why = self._listed_filter(row)
        if why is not None:
            return "filtered", why
        if token is None or self.opts.full:
            return None
        remembered = self.state.filtered(row["run_key"], f"{token}|{self._sig}")
        if remembered is not None:
            return "filtered", remembered
        have = self._dest_index(row["project_key"]).get(row["run_key"])
        if have is not None and have[0] == token:
            return "unchanged", have[1]
        return None

    def _dest_index(self, project_key: str) -> dict[str, tuple[str | None, str]]:
        with self._lock:
            if project_key not in self._synced:
                incremental = isinstance(self.sink, IncrementalSink)
                self._synced[project_key] = self.sink.synced(project_key) if incremental else {}
            return self._synced[project_key]

    def _listed_filter(self, row: dict[str, Any]) -> str | None:
        """Filters the listing can decide (a run leaves out only what it surely fails)."""
        f = self.pair.filters
        if f.updated_since and row.get(UPDATED) is not None and row[UPDATED] < f.updated_since:
            return f"not updated since {f.updated_since.isoformat()}"
        if LABELS in row:
            why = _label_filter(f, row[LABELS])
            if why:
                return why
        if STATUS in row and f.states and row[STATUS] not in f.states:
            return f"state {row[STATUS]} not in {', '.join(f.states)}"
        return None

    def keep(self, payload: RunPayload) -> str | None:
        f = self.pair.filters
        run = payload.run
        why = _label_filter(f, run.get("labels") or [])
        if not why and f.states and (run.get("status") or "finished") not in f.states:
            why = f"state {run.get('status')} not in {', '.join(f.states)}"
        if why:
            # worth remembering: the run had to be read to decide, and only the run or
            # the filters changing can change the answer (unlike its age, which moves)
            with self._lock:
                self._read_to_decide.add(payload.key)
            return why
        if f.updated_since:
            last = max(
                (t for t in (run.get("end_time"), run.get("start_time")) if t is not None), default=None
            )
            if last is not None and run.get("status") != "running" and last < f.updated_since:
                return f"not updated since {f.updated_since.isoformat()}"
        return None

    def done(self, row: dict[str, Any], rr: RunReport) -> None:
        token = row.get(TOKEN)
        if rr.outcome == "filtered" and token is not None and row["run_key"] in self._read_to_decide:
            self.state.remember_filtered(row["run_key"], f"{token}|{self._sig}", rr.reason)
        elif rr.outcome in ("new", "updated", "unchanged"):
            self.state.remember_filtered(row["run_key"], None, None)

    def registry_selection(self, sel: Selection, report: Report, read: list[str]) -> Selection | None:
        """Register the versions of the runs this sync put in the destination, never of a
        run a filter left out. A run skipped unread has not changed, so neither have its
        artifacts nor, offline, their aliases: only the runs read are asked. A source
        whose aliases move on their own (W&B online) is asked about every synced run."""
        synced = [r.run_key for r in report.runs if r.outcome in ("new", "updated", "unchanged")]
        if not (self.opts.full or self.source.aliases_move_without_runs):
            was_read = set(read)
            synced = [k for k in synced if k in was_read]
        return replace(sel, runs=frozenset(synced)) if synced else None


def _label_filter(f: Filters, labels: list[str]) -> str | None:
    if f.tags and not set(labels) & set(f.tags):
        return f"has none of the tags {', '.join(f.tags)}"
    hit = sorted(set(labels) & set(f.exclude_tags))
    if hit:
        return f"has the excluded tag {hit[0]}"
    return None


def shard_of(run_key: str, n: int) -> int:
    """A stable hash, the same on every machine and Python (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(run_key.encode()).digest()[:8], "big") % n


def _family_roots(runs: list[dict[str, Any]]) -> dict[str, str]:
    """Each run's top parent: a nested run goes to its top parent's shard, so a parent
    is always written before (or with) its children."""
    by_key = {r["run_key"]: r for r in runs}
    out = {}
    for r in runs:
        key, seen = r["run_key"], set()
        while True:
            parent = by_key[key].get("parent_run_key")
            if not parent or parent not in by_key or parent in seen:
                break
            seen.add(key)
            key = parent
        out[r["run_key"]] = key
    return out


# -- deltas


class DeltaSink:
    """The destination, plus a bundle of every run that changed: the audit trail."""

    def __init__(self, sink: Any, writer: Any) -> None:
        self.sink, self.writer = sink, writer
        self.runs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)  # synced(), describe(), ...

    def begin(self, source: str) -> None:
        self.sink.begin(source)
        self.writer.begin(source)

    def write_project(self, row: dict[str, Any]) -> None:
        self.sink.write_project(row)
        self.writer.write_project(row)

    def write_run(self, payload: RunPayload, report: RunReport) -> str:
        outcome = self.sink.write_run(payload, report)
        if outcome in ("new", "updated"):
            self.writer.write_run(payload, RunReport(payload.key))
            self.runs += 1
        return outcome

    def write_artifact(self, payload: Any, report: Any) -> None:
        self.sink.write_artifact(payload, report)
        self.writer.write_artifact(payload, Report())

    def write_registry(self, payload: Any, report: Any) -> None:
        self.sink.write_registry(payload, report)
        self.writer.write_registry(payload, Report())

    def finish(self) -> None:
        self.sink.finish()
        self.writer.finish()


def prune_deltas(folder: Path, keep_days: int, now: datetime | None = None) -> list[Path]:
    """Delete the delta bundles older than ``keep_days``; they are named by their time."""
    now = now or datetime.now(UTC)
    gone = []
    for d in sorted(folder.glob("*")) if folder.exists() else []:
        try:
            when = datetime.strptime(d.name, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            continue  # not ours
        if now - when > timedelta(days=keep_days):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


# -- running it


@dataclass
class PairResult:
    pair: Pair
    report: Report | None
    seconds: float
    error: str | None = None
    exit_code: int = 0
    delta: str | None = None
    retries: int = 0
    verify_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pair": self.pair.name,
            "source": redact(self.pair.source),
            "destination": redact(self.pair.destination),
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
            "retries": self.retries,
            "delta_bundle": self.delta,
        }
        if self.error:
            out["error"] = scrub(self.error)
        if self.report is not None:
            out.update(self.report.to_json())
        if self.verify_code is not None:
            out["verify_exit_code"] = self.verify_code
        return out


def sync_pair(pair: Pair, opts: Options, bar: Any = None) -> PairResult:
    """One pair, under its lock. What stops the whole pair (the lock, its configuration,
    a side that cannot be reached) raises a TrackbridgeError; a run's failure is in the
    report and the pair goes on."""
    from trackbridge.bundle import BundleWriter
    from trackbridge.retry import POLICY
    from trackbridge.uri import default_workers, open_sink, open_source, parse

    parse(pair.source)
    parse(pair.destination)
    if pair.experiment:
        check_template(pair.experiment, f"pair {pair.name}")
    state = State(opts.state_dir, pair, opts.shard)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    retries0 = POLICY.retries
    delta_path = None
    source = None
    with state.locked():
        try:
            source = open_source(pair.source)
            sink: Any = open_sink(pair.destination, artifact_root=pair.artifact_root)
            if opts.deltas:
                root = opts.delta_dir / slug(pair.name) if opts.delta_dir else state.dir / "deltas"
                delta_path = root / started.strftime("%Y%m%dT%H%M%SZ")
                sink = DeltaSink(sink, BundleWriter(delta_path))
            plan = SyncPlan(pair, opts, state, source, sink)
            # as `migrate` and `import` pick it: by the destination (a local source is
            # read from several threads as well as one)
            workers = opts.workers or default_workers(pair.destination)
            report = engine.copy(
                source, sink, pair.selection(), workers=workers, bar=bar, label="sync", plan=plan
            )
            state.record(started, report)
            if opts.deltas and delta_path is not None:
                if sink.runs == 0:
                    shutil.rmtree(delta_path, ignore_errors=True)  # nothing moved: no empty bundle
                    delta_path = None
                prune_deltas(delta_path.parent if delta_path else root, opts.keep_deltas)
        finally:
            state.close()
            if source is not None:
                source.close()
    result = PairResult(pair, report, time.perf_counter() - t0, delta=str(delta_path) if delta_path else None)
    result.retries = POLICY.retries - retries0
    result.exit_code = 1 if report.failed else 0
    return result
