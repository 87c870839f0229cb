"""Copy everything a Selection picks from a Source into a Sink.

This is the one place that decides order and parallelism, so every adapter stays a
plain translator. Runs go in waves: a parent before its children, so an importer can
always resolve a child's parent; runs within a wave go in parallel. A failure on one
run is recorded and the others go on; the report says what failed and why.
"""

from __future__ import annotations

import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from bridge.errors import TrackbridgeError, UsageError, first_line
from bridge.model import Selection, Sink, Source
from bridge.progress import Bar
from bridge.report import Report


def waves(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group runs by nesting depth so that parents are always written first."""
    by_key = {r["run_key"]: r for r in runs}
    depth: dict[str, int] = {}

    def d(key: str, seen: frozenset[str] = frozenset()) -> int:
        if key in depth:
            return depth[key]
        parent = by_key[key].get("parent_run_key")
        if not parent or parent not in by_key or parent in seen:
            depth[key] = 0
        else:
            depth[key] = d(parent, seen | {key}) + 1
        return depth[key]

    out: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(d(r["run_key"]), []).append(r)
    return [out[k] for k in sorted(out)]


def copy(
    source: Source,
    sink: Sink,
    sel: Selection,
    *,
    workers: int = 1,
    bar: Bar | None = None,
    label: str = "runs",
) -> Report:
    bar = bar or Bar(None)
    report = Report(source=source.describe(), destination=getattr(sink, "describe", str)())
    sink.begin(source.describe())
    projects = source.projects(sel)
    if sel.projects and not projects:
        raise UsageError(f"no project/experiment matches {', '.join(sel.projects)} in {source.describe()}")
    for p in projects:
        sink.write_project(p)
    runs = source.runs(sel, projects)
    if sel.runs and not runs:
        raise UsageError(f"no run matches {', '.join(sel.runs)} in {source.describe()}")
    task = bar.add(label, len(runs))

    def one(row: dict[str, Any]) -> None:
        rr = report.run(row["run_key"], row.get("name"))
        try:
            payload = source.read_run(row)
            for note in payload.source_notes:
                rr.mapped(*note)
            rr.outcome = sink.write_run(payload, rr)
        except TrackbridgeError as e:
            rr.outcome, rr.error = "failed", str(e)
        except Exception as e:
            rr.outcome = "failed"
            rr.error = f"{type(e).__name__}: {first_line(e)}"
            rr._traceback = traceback.format_exc()  # type: ignore[attr-defined]
        bar.advance(task, 1, rr.points)

    for wave in waves(runs):
        if workers <= 1:
            for row in wave:
                one(row)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tb-run") as ex:
                for f in as_completed([ex.submit(one, row) for row in wave]):
                    f.result()

    for art in source.artifacts(sel, projects):
        _guard(report, f"artifact {art.row['artifact_key']}", sink.write_artifact, art, report)
    if sel.registry:
        _guard(report, "registry", lambda: sink.write_registry(source.registry(sel), report))
    sink.finish()
    return report


def _guard(report: Report, what: str, fn: Any, *args: Any) -> None:
    """Record a failure as one line in the report instead of stopping the whole copy."""
    try:
        fn(*args)
    except TrackbridgeError as e:
        report.errors.append(f"{what}: {e}")
    except Exception as e:  # reported; the exit code says partial
        report.errors.append(f"{what}: {type(e).__name__}: {first_line(e)}")
