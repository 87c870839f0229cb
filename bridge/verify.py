"""Compare a source with a destination, field by field, and list every difference.

Both sides are read through the same Source interface, so verify works for any pair of
trackers and for bundles. Objects are matched by identity: a destination object that
trackbridge wrote carries its source key (``Source.origin_of``); one read from a bundle
keeps its key. Memory stays at one run per side, as in the copy itself.
"""

from __future__ import annotations

import contextvars
import json
import math
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from trackbridge import schema
from trackbridge.files import sha256_file
from trackbridge.model import (
    ArtifactPayload,
    ProvenanceSource,
    RunPayload,
    Selection,
    Source,
    find_by_key,
    legacy_key,
)
from trackbridge.progress import Bar
from trackbridge.tracker import bookkeeping_tags
from trackbridge.uri import source_identity

# Run fields every destination so far can hold; times compare at the precision both
# trackers keep (their declarations' ``time_precision_ms``).
RUN_FIELDS = (
    "name",
    "status",
    "lifecycle",
    "start_time",
    "end_time",
    "user",
    "notes",
    "git_commit",
    "git_remote",
    "command",
    "group",
    "job_type",
    "host",
    "labels",
    "source_incomplete",
    "step_scale",
    "step_scales",
)
# The time unit both sides keep, in microseconds; set for the length of one verify.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PRECISION_US: contextvars.ContextVar[int] = contextvars.ContextVar("precision_us", default=1000)


def origin(src: Source, kind: str, key: str) -> str:
    return src.origin_of(kind, key) if isinstance(src, ProvenanceSource) else key


def verify(
    a: Source,
    b: Source,
    sel: Selection,
    bar: Bar | None = None,
    limit: int = 200,
    precision_ms: int = 1,
) -> tuple[list[str], dict[str, int]]:
    token = _PRECISION_US.set(precision_ms * 1000)
    try:
        return _verify(a, b, sel, bar, limit)
    finally:
        _PRECISION_US.reset(token)


def _verify(
    a: Source, b: Source, sel: Selection, bar: Bar | None, limit: int
) -> tuple[list[str], dict[str, int]]:
    bar = bar or Bar(None)
    diffs: list[str] = []
    stats = Counter()

    def diff(msg: str) -> None:
        stats["differences"] += 1
        if len(diffs) < limit:
            diffs.append(msg)

    a_projects, matched = _compare_projects(a, b, sel, diff, stats)
    _compare_runs(a, b, sel, a_projects, matched, bar, diff, stats)
    _compare_standalone(a, b, sel, a_projects, matched, diff)
    if sel.registry:
        _compare_registry(a, b, sel, diff, stats)
    return diffs, dict(stats)


def _compare_projects(
    a: Source, b: Source, sel: Selection, diff: Any, stats: Counter
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The source's projects, each against its destination project; returns the source's
    and the matched destination's."""
    a_projects = a.projects(sel)
    b_projects = b.projects(Selection())
    b_by_name = {p["name"]: p for p in b_projects}
    # A project trackbridge imported carries its source key, so it is found even when a
    # naming template (sync's experiment = "...") gave it another name. One that an
    # earlier trackbridge imported carries the key without its creation time
    # (legacy_key): that matches only when no other destination project carries it.
    b_origins = [origin(b, "project", q["project_key"]) for q in b_projects]
    b_by_origin = dict(zip(b_origins, b_projects, strict=True))
    legacy = Counter(b_origins)
    found: dict[str, dict[str, Any]] = {}
    for p in a_projects:
        old = legacy_key(p["project_key"])
        q = (
            b_by_origin.get(p["project_key"])
            or (b_by_origin.get(old) if old != p["project_key"] and legacy[old] == 1 else None)
            or b_by_name.get(p["name"])
        )
        stats["projects"] += 1
        if q is None:
            diff(f"project {p['name']!r}: missing in destination")
            continue
        found[p["project_key"]] = q
        for f in ("description", "lifecycle"):
            if p.get(f) != q.get(f):
                diff(f"project {p['name']!r}: {f} {p.get(f)!r} != {q.get(f)!r}")
        ta, tb = _tags(p.get("tags")), _tags(q.get("tags"))
        if ta != tb:
            diff(f"project {p['name']!r}: tags differ: {_dict_diff(ta, tb)}")
    return a_projects, list({q["project_key"]: q for q in found.values()}.values())


def _compare_runs(
    a: Source,
    b: Source,
    sel: Selection,
    a_projects: list[dict[str, Any]],
    matched: list[dict[str, Any]],
    bar: Bar,
    diff: Any,
    stats: Counter,
) -> None:
    """Every source run against the destination run carrying its key, field by field and
    point by point; duplicates, and runs the source no longer has, too."""
    a_runs = a.runs(sel, a_projects)
    b_runs = b.runs(Selection(), matched)
    b_origin = {r["run_key"]: origin(b, "run", r["run_key"]) for r in b_runs}
    b_by_origin = {b_origin[r["run_key"]]: r for r in b_runs}
    # only a source read whole can say a destination run is one it no longer has: a
    # filter (a project too: a naming template may merge projects) leaves runs out
    whole = not (sel.projects or sel.runs or sel.since or sel.until or not sel.include_deleted)
    _copies(
        "run",
        [(b_origin[r["run_key"]], r["run_key"], r.get("source_id")) for r in b_runs],
        {r["run_key"] for r in a_runs},
        a,
        b,
        whole,
        diff,
    )
    task = bar.add("verify", len(a_runs))
    for r in a_runs:
        stats["runs"] += 1
        q = b_by_origin.get(r["run_key"])
        label = f"run {r.get('name')!r} ({r['run_key']})"
        if q is None:
            diff(f"{label}: missing in destination")
            bar.advance(task)
            continue
        # Compare the rows read_run gives: a listing may be partial (W&B reads a run's
        # fields only with its log), and reading restores what the importer mapped.
        pa_, pb_ = a.read_run(r), b.read_run(q)
        for f in RUN_FIELDS:
            va, vb = _norm(pa_.run.get(f)), _norm(pb_.run.get(f))
            if va != vb:
                diff(f"{label}: {f} {va!r} != {vb!r}")
        for f, what in (("parent_run_key", "parent"), ("sweep_key", "sweep")):
            vb = b_origin.get(pb_.run.get(f) or "", pb_.run.get(f))
            if pa_.run.get(f) != vb:
                diff(f"{label}: {what} {pa_.run.get(f)!r} != {vb!r}")
        points = _compare_run(label, pa_, pb_, a, b, diff)
        stats["points"] += points
        bar.advance(task, 1, points)


def _compare_run(label: str, ra: RunPayload, rb: RunPayload, a: Source, b: Source, diff: Any) -> int:
    params_a = {tuple(p["path"]): (p["value_json"], p["value_type"]) for p in ra.params.to_pylist()}
    params_b = {tuple(p["path"]): (p["value_json"], p["value_type"]) for p in rb.params.to_pylist()}
    if params_a != params_b:
        diff(f"{label}: params differ: {_dict_diff(params_a, params_b)}")
    tags_a, tags_b = _run_tags(ra), _run_tags(rb)
    if tags_a != tags_b:
        diff(f"{label}: tags differ: {_dict_diff(tags_a, tags_b)}")
    ma, n = _metric_counter(ra)
    mb, _ = _metric_counter(rb)
    if ma != mb:
        only_a = ma - mb
        only_b = mb - ma
        diff(
            f"{label}: metrics differ: {sum(only_a.values())} point(s) only in source "
            f"(e.g. {_sample(only_a)}), {sum(only_b.values())} only in destination "
            f"(e.g. {_sample(only_b)})"
        )
    for name, cols in (("summary", ("path", "value_json")), ("series", SERIES_COLUMNS)):
        xa, xb = _rows(getattr(ra, name), cols), _rows(getattr(rb, name), cols)
        if xa != xb:
            diff(
                f"{label}: {name} differs: {len(xa - xb)} value(s) only in source, "
                f"{len(xb - xa)} only in destination"
            )
    da = sorted(json.dumps(d, default=str, sort_keys=True) for d in _datasets(ra))
    db = sorted(json.dumps(d, default=str, sort_keys=True) for d in _datasets(rb))
    if da != db:
        diff(f"{label}: dataset inputs differ")
    arts_a = {_art_identity(x): x for x in ra.artifacts}
    arts_b = {_art_identity(x): x for x in rb.artifacts}
    models = [x.row["artifact_key"] for x in rb.artifacts if x.row["type"] == schema.LOGGED_MODEL]
    _copies(
        f"{label}: logged model",
        [(origin(b, "artifact", k), k, k) for k in models],
        set(),
        a,
        b,
        False,
        diff,
    )
    for ident, x in arts_a.items():
        y = arts_b.get(ident)
        if y is None:
            if x.files or x.row["type"] != "run-files":
                diff(f"{label}: artifact {ident} missing in destination")
            continue
        _compare_artifact(f"{label}: artifact {ident}", x, y, diff)
    for ident, y in arts_b.items():
        if ident not in arts_a and y.files:
            diff(f"{label}: artifact {ident} only in destination")
    return n


def _compare_artifact(label: str, x: ArtifactPayload, y: ArtifactPayload, diff: Any) -> None:
    if x.row["type"] == schema.LOGGED_MODEL:
        ma = _model_meta(x.row.get("metadata_json"))
        mb = _model_meta(y.row.get("metadata_json"))
        if ma != mb:
            diff(f"{label}: metadata differs: {_dict_diff(ma, mb)}")
    fa = {f.path: f for f in x.files}
    fb = {f.path: f for f in y.files}
    if set(fa) != set(fb):
        diff(
            f"{label}: files differ: only in source {sorted(set(fa) - set(fb))[:5]}, "
            f"only in destination {sorted(set(fb) - set(fa))[:5]}"
        )
    for path in sorted(set(fa) & set(fb)):
        if _is_reference(fa[path]) or _is_reference(fb[path]):
            if fa[path].uri != fb[path].uri:
                diff(f"{label}: file {path}: reference {fa[path].uri!r} != {fb[path].uri!r}")
            continue
        if fa[path].size is not None and fb[path].size is not None and fa[path].size != fb[path].size:
            diff(f"{label}: file {path}: size {fa[path].size} != {fb[path].size}")
            continue
        # the destination's bytes themselves, never a digest it merely records (an MLflow
        # destination keeps the source's SHA-256 of a W&B file in extras.json)
        want, got = _digest(fa[path]), _digest(fb[path], trust_recorded=False)
        if want != got:
            diff(f"{label}: file {path}: content differs (SHA-256 {want[:12]}… in source, {got[:12]}… here)")


def _compare_standalone(a: Source, b: Source, sel: Selection, ap: list, bp: list, diff: Any) -> None:
    # by identity: a destination's copy carries its source's key (a Neptune model version
    # becomes an MLflow logged model, of another type and sharing its name with others)
    xa = {origin(a, "artifact", x.row["artifact_key"]): x for x in a.artifacts(sel, ap)}
    listed = list(b.artifacts(Selection(), bp))
    xb = {origin(b, "artifact", x.row["artifact_key"]): x for x in listed}
    keys = [x.row["artifact_key"] for x in listed]
    _copies("artifact", [(origin(b, "artifact", k), k, k) for k in keys], set(xa), a, b, False, diff)
    for ident, x in xa.items():
        if ident not in xb:
            diff(f"artifact {ident}: missing in destination")
        else:
            _compare_artifact(f"artifact {ident}", x, xb[ident], diff)


def _compare_registry(a: Source, b: Source, sel: Selection, diff: Any, stats: Counter) -> None:
    ra, rb = a.registry(sel), b.registry(Selection())
    models_b = {m["name"]: m for m in rb.registered_models.to_pylist()}
    for m in ra.registered_models.to_pylist():
        stats["registered_models"] += 1
        q = models_b.get(m["name"])
        if q is None:
            diff(f"registered model {m['name']!r}: missing in destination")
            continue
        if (m["description"] or None) != (q["description"] or None):
            diff(f"registered model {m['name']!r}: description differs")
        ta, tb = _tags(m["tags"]), _tags(q["tags"])
        if ta != tb:
            diff(f"registered model {m['name']!r}: tags differ: {_dict_diff(ta, tb)}")
    b_versions = rb.model_versions.to_pylist()
    a_versions = ra.model_versions.to_pylist()
    v_origins = [origin(b, "model_version", v["version_key"]) for v in b_versions]
    vb = dict(zip(v_origins, b_versions, strict=True))
    _copies(
        "model version",
        [
            (
                origin(b, "model_version", v["version_key"]),
                v["version_key"],
                f"{v['model_name']} v{v['version']}",
            )
            for v in b_versions
        ],
        {v["version_key"] for v in a_versions},
        a,
        b,
        not (sel.projects or sel.runs or sel.since or sel.until),
        diff,
    )
    b_runs = b.origin_of if isinstance(b, ProvenanceSource) else None
    for v in a_versions:
        stats["model_versions"] += 1
        label = f"model version {v['model_name']!r} v{v['version']}"
        w = find_by_key(vb, v["version_key"])
        if w is None:
            diff(f"{label}: missing in destination")
            continue
        for f in ("model_name", "stage", "status", "description", "source_subpath"):
            if f == "source_subpath" and not v[f]:
                continue  # the source left the place of the files to the destination
            if _none(v[f]) != _none(w[f]):
                diff(f"{label}: {f} {v[f]!r} != {w[f]!r}")
        if sorted(v["aliases"] or []) != sorted(w["aliases"] or []):
            diff(f"{label}: aliases {v['aliases']} != {w['aliases']}")
        if _tags(v["tags"]) != _tags(w["tags"]):
            diff(f"{label}: tags differ: {_dict_diff(_tags(v['tags']), _tags(w['tags']))}")
        wr = b_runs("run", w["run_key"]) if b_runs and w["run_key"] else w["run_key"]
        if v["run_key"] != wr:
            diff(f"{label}: run {v['run_key']!r} != {wr!r}")
        wa = b_runs("artifact", w["artifact_key"]) if b_runs and w["artifact_key"] else w["artifact_key"]
        if v["artifact_key"] != wa:
            diff(f"{label}: logged model {v['artifact_key']!r} != {wa!r}")


# --------------------------------------------------------------------------- helpers


def _none(v: Any) -> Any:
    """Empty, and MLflow's stage "None", mean no value."""
    return None if v in (None, "", "None") else v


def _norm(v: Any) -> Any:
    if isinstance(v, datetime):
        unit = timedelta(microseconds=_PRECISION_US.get())
        epoch = _EPOCH if v.tzinfo else _EPOCH.replace(tzinfo=None)
        return (epoch + (v - epoch) // unit * unit).isoformat()
    if isinstance(v, list):
        return sorted(v)  # labels: a set; MLflow keeps them as tags, in key order
    if v is False:
        return None  # "not incomplete" is the same as unknown
    return v


SERIES_COLUMNS = ("key", "step", "timestamp", "kind", "value_json", "file_path")


def _rows(tbl: Any, cols: tuple[str, ...]) -> set[str]:
    return {
        json.dumps([_same_json(r[c]) if c == "value_json" else _norm(r[c]) for c in cols], default=str)
        for r in tbl.select(list(cols)).to_pylist()
    }


def _same_json(text: str | None) -> Any:
    """A JSON value as its readers see it: ``0.0`` and ``0`` are one number (W&B writes
    a whole float back without its ``.0``), object keys in one order."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text

    def whole(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            return int(v)
        if isinstance(v, list):
            return [whole(x) for x in v]
        if isinstance(v, dict):
            return {k: whole(x) for k, x in v.items()}
        return v

    return json.dumps(whole(value), sort_keys=True, allow_nan=True)


def _tags(v: Any) -> dict[str, str]:
    d = dict(v or [])
    return {k: x for k, x in d.items() if not k.startswith("trackbridge.")}


def _run_tags(r: RunPayload) -> dict[str, str]:
    ignored = bookkeeping_tags()  # what a tracker keeps for a field compared elsewhere
    return {
        t["key"]: t["value"]
        for t in r.tags.to_pylist()
        if t["key"] not in ignored and not t["key"].startswith("trackbridge.")
    }


def _metric_counter(r: RunPayload) -> tuple[Counter, int]:
    unit = _PRECISION_US.get()
    c: Counter = Counter()
    n = 0
    for b in r.metrics():
        keys = b.column("key").to_pylist()
        steps = b.column("step").to_pylist()
        ts = b.column("timestamp").cast("int64").to_pylist()
        vals = b.column("value").to_pylist()
        for i in range(len(keys)):
            v = vals[i]
            c[(keys[i], steps[i], ts[i] // unit, "nan" if v != v else repr(v))] += 1
        n += len(keys)
    return c, n


def _sample(c: Counter) -> str:
    return ", ".join(map(str, list(c)[:3])) or "-"


def _datasets(r: RunPayload) -> Iterator[dict[str, Any]]:
    for d in r.dataset_inputs.to_pylist():
        d = dict(d)
        d.pop("run_key")
        d["tags"] = sorted(d["tags"] or [])
        yield d


def _is_reference(f: Any) -> bool:
    """A file whose bytes live elsewhere (``s3://…``): compared by address, never fetched."""
    return bool(f.uri) and f.sha256 is None


def _art_identity(x: ArtifactPayload) -> str:
    return f"{x.row['type']}:{x.row.get('name')}"


def _model_meta(text: str | None) -> dict[str, Any]:
    m = json.loads(text or "{}")
    metrics = sorted(
        (
            x["key"],
            x["step"],
            x["timestamp"],
            "nan" if _isnan(x["value"]) else repr(x["value"]),
            x.get("dataset_name"),
            x.get("dataset_digest"),
        )
        for x in m.get("metrics", [])
    )
    ignored = bookkeeping_tags()
    return {
        "model_type": m.get("model_type"),
        "status": m.get("status"),
        "params": m.get("params", {}),
        "tags": {k: v for k, v in _tags(m.get("tags", {})).items() if k not in ignored},
        "metrics": metrics,
    }


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _digest(f: Any, trust_recorded: bool = True) -> str:
    if f.sha256 and trust_recorded:
        return f.sha256
    with f.fetch() as local:
        return sha256_file(local)


def _copies(
    kind: str,
    objects: list[tuple[str, str, Any]],
    source_keys: set[str],
    a: Source,
    b: Source,
    whole: bool,
    diff: Any,
) -> None:
    """Destination objects that trackbridge wrote, as (source key, own key, label): each
    source key more than once is a duplicate; with ``whole`` (no filter narrowed the
    source), one whose key the source lacks, recorded as coming from this very source,
    is an object the source no longer has."""
    imported = [(o, k, lbl) for o, k, lbl in objects if o != k]
    counts = Counter(o for o, _, _ in imported)
    for o, n in counts.items():
        if n > 1:
            ids = sorted(str(lbl) for x, _, lbl in imported if x == o)
            diff(f"{kind} {o}: {n} copies in destination ({', '.join(ids[:5])}); expected one")
    if not whole:
        return
    here = source_identity(a)
    if not isinstance(b, ProvenanceSource):
        return
    for o, k, lbl in imported:
        if o not in source_keys and b.recorded_source(k) == here:
            diff(f"{kind} {o}: only in destination ({lbl}); the source does not have it")


def _dict_diff(a: dict, b: dict) -> str:
    parts = []
    for k in sorted(set(a) | set(b), key=str):
        if k not in b:
            parts.append(f"{k!r} only in source")
        elif k not in a:
            parts.append(f"{k!r} only in destination")
        elif a[k] != b[k]:
            va, vb = str(a[k]), str(b[k])
            parts.append(f"{k!r}: {va[:80]!r} != {vb[:80]!r}")
        if len(parts) >= 5:
            parts.append("…")
            break
    return "; ".join(parts)
