"""What a sync is asked to do: its pairs, filters, naming and options, from the command
line or a ``sync.toml``, checked in full before anything is read (a typo in a config
file is one line naming the key, not a sync that quietly does something else).
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from trackbridge.errors import UsageError
from trackbridge.model import (
    ModelRule,
    Selection,
)
from trackbridge.uri import canonical, redact

_FIELDS = ("project", "entity", "source_id", "system")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60] or "pair"


STATES = ("running", "finished", "failed", "crashed", "killed", "scheduled")


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
    artifact_root: str | None = None  # MLflow destinations: where new experiments keep files

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
        return f"{slug(self.name)[:40]}-{hashlib.sha256(self.identity.encode()).hexdigest()[:10]}"

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


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``K/N``, or ``auto``: read from the scheduler that started this process."""
    if not text:
        return None
    if text.strip().lower() == "auto":
        return shard_from_scheduler(os.environ if env is None else env)
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise UsageError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 2/8, or auto")
    return int(m.group(1)), int(m.group(2))


AUTO_HELP = (
    "TRACKBRIDGE_SHARD=K/N; a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, the count "
    "from TRACKBRIDGE_SHARD_COUNT or read from the Job); a Slurm job array "
    "(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_MIN)"
)


def shard_from_scheduler(env: Mapping[str, str], k8s_account: Path | None = None) -> tuple[int, int]:
    """This task's shard, from what its scheduler set: every scheduler found must say
    the same shard, and one must be found (a guess would copy runs twice or never).
    ``k8s_account``: where a pod's service account is mounted (Kubernetes' own place)."""
    found: dict[str, tuple[int, int]] = {}
    if env.get("TRACKBRIDGE_SHARD"):
        text = env["TRACKBRIDGE_SHARD"]
        m = re.fullmatch(r"\s*(\d+)/(\d+)\s*", text)
        if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
            raise UsageError(f"TRACKBRIDGE_SHARD={text!r}: expected K/N with 1 <= K <= N, e.g. 2/8")
        found["TRACKBRIDGE_SHARD"] = (int(m.group(1)), int(m.group(2)))
    if env.get("JOB_COMPLETION_INDEX") is not None and env.get("JOB_COMPLETION_INDEX") != "":
        index = _whole(env, "JOB_COMPLETION_INDEX")
        if env.get("TRACKBRIDGE_SHARD_COUNT"):
            n = _whole(env, "TRACKBRIDGE_SHARD_COUNT")
        else:  # the count is the Job's: asked of the Kubernetes API
            from trackbridge.k8s import SERVICE_ACCOUNT, job_completions

            n = job_completions(env, index, k8s_account or SERVICE_ACCOUNT)
        if not 0 <= index < n:
            raise UsageError(f"--shard auto: JOB_COMPLETION_INDEX={index} is not below the shard count, {n}")
        found["JOB_COMPLETION_INDEX"] = (index + 1, n)
    if env.get("SLURM_ARRAY_TASK_ID"):
        task = _whole(env, "SLURM_ARRAY_TASK_ID")
        n = _whole(env, "SLURM_ARRAY_TASK_COUNT")
        low = _whole(env, "SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN") else 0
        step = _whole(env, "SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") else 1
        k, off = divmod(task - low, step or 1)
        if off or not 0 <= k < n:
            raise UsageError(
                f"--shard auto: Slurm array task {task} is not one of {n} evenly spaced from {low} "
                f"(step {step}); give the array as a range (--array=0-{n - 1}) or use --shard K/N"
            )
        found["SLURM_ARRAY_TASK_ID"] = (k + 1, n)
    if not found:
        raise UsageError(
            f"--shard auto: no scheduler's shard found in the environment; looked for {AUTO_HELP}"
        )
    if len(set(found.values())) > 1:
        said = ", ".join(f"{k} says {v[0]}/{v[1]}" for k, v in found.items())
        raise UsageError(f"--shard auto: the environment contradicts itself ({said})")
    return next(iter(found.values()))


def _whole(env: Mapping[str, str], name: str) -> int:
    text = env.get(name)
    if text is None:
        raise UsageError(f"--shard auto: {name} is not set")
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise UsageError(f"--shard auto: {name}={text!r} is not a whole number")
    return int(text)


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
    _check_settings(p, settings, retry)
    raw_pairs = doc.get("pair", [])
    if not raw_pairs:
        raise UsageError(f"{p}: no [[pair]]; add at least one with a source and a destination")
    pairs = [_pair(t, f"{p}: pair {t.get('name') or i}") for i, t in enumerate(raw_pairs, 1)]
    names = [x.name for x in pairs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UsageError(f"{p}: two pairs are named {dup!r}; names key their state")
    return pairs, settings, retry


def _check_settings(p: Path, settings: dict[str, Any], retry: dict[str, Any]) -> None:
    """[sync] and [retry] values of the right type and size."""
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


def _pair(t: dict[str, Any], where: str) -> Pair:
    """One [[pair]] table, checked key by key."""
    _check_keys(
        t, {"name", "source", "destination", "experiment", "artifact_root", "filter", "registry"}, where
    )
    if not isinstance(t.get("artifact_root", ""), str):
        raise UsageError(f"{where}: artifact_root must be a string (a folder or a URI)")
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
    return Pair(
        source=t["source"],
        destination=t["destination"],
        name=t.get("name", ""),
        experiment=template,
        artifact_root=t.get("artifact_root"),
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
