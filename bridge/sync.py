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
import re
import shutil
import socket
import sqlite3
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bridge import engine
from bridge.errors import TrackbridgeError, UsageError
from bridge.locks import host_lock_path, try_lock
from bridge.model import LABELS, STATUS, TOKEN, UPDATED, ModelRule, RunPayload, Selection
from bridge.report import Report, RunReport, scrub
from bridge.uri import canonical, redact

STATES = ("running", "finished", "failed", "crashed", "killed", "scheduled")


class LockedError(TrackbridgeError):
    """Another sync of the same pair holds the lock."""

    exit_code = 75  # EX_TEMPFAIL: try again later


# -- configuration


@dataclass
class Filters:
    """Which runs a pair copies. Empty means all."""

    projects: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # a run with any of these labels (W&B tags)
    exclude_tags: tuple[str, ...] = ()  # ...and none of these
    states: tuple[str, ...] = ()  # finished, failed, crashed, killed, running
    started_since: datetime | None = None
    updated_since: datetime | None = None


@dataclass
class Pair:
    source: str
    destination: str
    name: str = ""
    filters: Filters = field(default_factory=Filters)
    experiment: str | None = None  # naming template: "{project}", "wandb/{entity}/{project}"
    registry: bool = True  # registry links and rules
    register_models: bool = False
    rules: tuple[ModelRule, ...] = ()

    def __post_init__(self) -> None:
        self.name = self.name or f"{redact(self.source)} -> {redact(self.destination)}"

    @property
    def identity(self) -> str:
        """The pair however it is spelt (``/x`` and ``/x/``, a relative path, a link to
        the folder, another name in a config file): what its lock is keyed on."""
        return f"{canonical(self.source)} -> {canonical(self.destination)}"

    @property
    def pair_id(self) -> str:
        """Stable across runs, credentials left out: names the pair's state folder."""
        return f"{_slug(self.name)[:40]}-{hashlib.sha256(self.identity.encode()).hexdigest()[:10]}"

    def selection(self) -> Selection:
        f = self.filters
        return Selection(
            projects=f.projects,
            runs=f.runs,
            since=f.started_since,
            registry=self.registry,
            register_models=self.register_models,
            model_rules=self.rules,
        )


@dataclass
class Options:
    state_dir: Path
    workers: int | None = None
    shard: tuple[int, int] | None = None  # (K, N), K from 1
    deltas: bool = False
    delta_dir: Path | None = None
    keep_deltas: int = 30  # days
    full: bool = False  # ignore tokens and remembered filters: read every run
    verify: bool = False
    report: str | None = None
    quiet: bool = False


def default_state_dir() -> Path:
    env = os.environ.get("TRACKBRIDGE_STATE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "trackbridge"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise UsageError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 2/8")
    return int(m.group(1)), int(m.group(2))


def parse_when(text: Any, where: str) -> datetime | None:
    """An ISO date or time (UTC unless it says), or an age: 36h, 7d, 2w."""
    if text is None or text == "":
        return None
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=UTC)
    s = str(text).strip()
    m = re.fullmatch(r"(\d+)\s*([hdw])", s)
    if m:
        hours = int(m.group(1)) * {"h": 1, "d": 24, "w": 168}[m.group(2)]
        return datetime.now(UTC) - timedelta(hours=hours)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError as e:
        raise UsageError(
            f"{where}: {s!r} is neither an ISO date (2026-01-31) nor an age (36h, 7d, 2w)"
        ) from e
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{where}: expected a string or a list of strings")


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}")


def load_config(path: str | Path) -> tuple[list[Pair], dict[str, Any], dict[str, Any]]:
    """Read sync.toml: its pairs, its [sync] settings and its [retry] limits.

    Strict: an unknown key is an error, not ignored, since a misspelt filter would
    otherwise copy everything.
    """
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError as e:
        raise UsageError(f"{p}: no such config file") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{p}: not valid TOML ({e})") from e
    _check_keys(doc, {"sync", "retry", "pair"}, str(p))
    settings = doc.get("sync", {})
    _check_keys(
        settings,
        {"state_dir", "workers", "deltas", "delta_dir", "keep_deltas", "report", "verify"},
        f"{p}: [sync]",
    )
    retry = doc.get("retry", {})
    _check_keys(retry, {"attempts", "initial_wait", "max_wait"}, f"{p}: [retry]")
    types: dict[str, tuple[type, ...]] = {
        "state_dir": (str,),
        "delta_dir": (str,),
        "report": (str,),
        "workers": (int,),
        "keep_deltas": (int,),
        "deltas": (bool,),
        "verify": (bool,),
        "attempts": (int,),
        "initial_wait": (int, float),
        "max_wait": (int, float),
    }
    for table, where in ((settings, "[sync]"), (retry, "[retry]")):
        for k, v in table.items():
            # bool is an int in Python; a count of True workers is still a mistake
            if not isinstance(v, types[k]) or (isinstance(v, bool) and bool not in types[k]):
                names = " or ".join(t.__name__ for t in types[k])
                raise UsageError(f"{p}: {where} {k} = {v!r}: expected {names}")
            if (
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and v < (1 if k in ("workers", "attempts") else 0)
            ):
                raise UsageError(f"{p}: {where} {k} = {v!r}: too small")
    pairs = []
    raw_pairs = doc.get("pair", [])
    if not raw_pairs:
        raise UsageError(f"{p}: no [[pair]]; add at least one with a source and a destination")
    for i, t in enumerate(raw_pairs, 1):
        where = f"{p}: pair {t.get('name') or i}"
        _check_keys(t, {"name", "source", "destination", "experiment", "filter", "registry"}, where)
        for k in ("source", "destination"):
            if not isinstance(t.get(k), str):
                raise UsageError(f"{where}: {k} is required (a URI, see trackbridge --help)")
        ft = t.get("filter", {})
        _check_keys(
            ft,
            {"projects", "runs", "tags", "exclude_tags", "states", "started_since", "updated_since"},
            f"{where}: [pair.filter]",
        )
        states = _strs(ft.get("states"), f"{where}: filter.states")
        bad = [s for s in states if s not in STATES]
        if bad:
            raise UsageError(f"{where}: filter.states: {bad[0]!r} is not one of {', '.join(STATES)}")
        rt = t.get("registry", {})
        _check_keys(rt, {"enabled", "register_models", "rule"}, f"{where}: [pair.registry]")
        rules = []
        for j, r in enumerate(rt.get("rule", []), 1):
            _check_keys(r, {"artifact", "type", "model", "aliases"}, f"{where}: registry rule {j}")
            rules.append(
                ModelRule(
                    artifact=r.get("artifact", "*"),
                    type=r.get("type", "*" if "artifact" in r else "model"),
                    model=r.get("model", "{artifact}"),
                    aliases=_strs(r.get("aliases"), f"{where}: registry rule {j}: aliases"),
                )
            )
        template = t.get("experiment")
        if template is not None:
            check_template(template, where)
        pairs.append(
            Pair(
                source=t["source"],
                destination=t["destination"],
                name=t.get("name", ""),
                experiment=template,
                filters=Filters(
                    projects=_strs(ft.get("projects"), f"{where}: filter.projects"),
                    runs=_strs(ft.get("runs"), f"{where}: filter.runs"),
                    tags=_strs(ft.get("tags"), f"{where}: filter.tags"),
                    exclude_tags=_strs(ft.get("exclude_tags"), f"{where}: filter.exclude_tags"),
                    states=states,
                    started_since=parse_when(ft.get("started_since"), f"{where}: filter.started_since"),
                    updated_since=parse_when(ft.get("updated_since"), f"{where}: filter.updated_since"),
                ),
                registry=bool(rt.get("enabled", True)),
                register_models=bool(rt.get("register_models", False)),
                rules=tuple(rules),
            )
        )
    names = [x.name for x in pairs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UsageError(f"{p}: two pairs are named {dup!r}; names key their state")
    return pairs, settings, retry


_FIELDS = ("project", "entity", "source_id", "system")


def check_template(template: str, where: str) -> None:
    try:
        template.format(**dict.fromkeys(_FIELDS, "x"))
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(
            f"{where}: experiment template {template!r}: {e}; use {', '.join('{' + f + '}' for f in _FIELDS)}"
        ) from e


def experiment_name(template: str, row: dict[str, Any]) -> str:
    source_id = str(row.get("source_id") or "")
    entity = source_id.split("/", 1)[0] if "/" in source_id else ""
    return template.format(
        project=row["name"], entity=entity, source_id=source_id, system=row.get("system", "")
    )


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
                synced = getattr(self.sink, "synced", None)
                self._synced[project_key] = synced(project_key) if synced else {}
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
        if not (self.opts.full or getattr(self.source, "aliases_move_without_runs", False)):
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
    from bridge.bundle import BundleWriter
    from bridge.retry import POLICY
    from bridge.uri import default_workers, open_sink, open_source, parse

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
            sink: Any = open_sink(pair.destination)
            if opts.deltas:
                root = opts.delta_dir / _slug(pair.name) if opts.delta_dir else state.dir / "deltas"
                delta_path = root / started.strftime("%Y%m%dT%H%M%SZ")
                sink = DeltaSink(sink, BundleWriter(delta_path))
            plan = SyncPlan(pair, opts, state, source, sink)
            workers = opts.workers or default_workers(pair.source, pair.destination)
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


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60] or "pair"
