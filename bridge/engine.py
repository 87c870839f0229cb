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

from trackbridge import schema
from trackbridge.errors import TrackbridgeError, UsageError, first_line
from trackbridge.model import (
    TOKEN,
    NoticingSource,
    PlanningSink,
    RegistryPayload,
    RunPayload,
    Selection,
    Sink,
    Source,
)
from trackbridge.progress import Bar
from trackbridge.report import Report, RunReport


def waves(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group runs by nesting depth so that parents are always written first."""
    by_key = {r["run_key"]: r for r in runs}
    depth: dict[str, int] = {}

    def d(key: str, seen: frozenset[str] = frozenset()) -> int:
        if key in depth:
            return depth[key]
        parent = schema.depends_on(by_key[key])
        if not parent or parent not in by_key or parent in seen:
            depth[key] = 0
        else:
            depth[key] = d(parent, seen | {key}) + 1
        return depth[key]

    out: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(d(r["run_key"]), []).append(r)
    return [out[k] for k in sorted(out)]


class Plan:
    """The hooks ``sync`` (trackbridge.sync) uses to make a copy incremental; the default plan
    copies everything, which is what ``migrate``, ``export`` and ``import`` want."""

    def project(self, row: dict[str, Any]) -> dict[str, Any]:
        """The project row as the destination should name it."""
        return row

    def select(self, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return runs

    def skip(self, row: dict[str, Any]) -> tuple[str, str | None] | None:
        """Decide a run without reading it: ("unchanged", destination id) or ("filtered",
        reason); None reads it."""
        return None

    def keep(self, payload: RunPayload) -> str | None:
        """After reading: a reason to leave the run out (a filter), else None."""
        return None

    def done(self, row: dict[str, Any], rr: RunReport) -> None:
        """Called once per run with its final outcome."""

    def registry_selection(self, sel: Selection, report: Report, read: list[str]) -> Selection | None:
        """The selection to read the registry with (None: leave the registry out)."""
        return sel


def check_projects(source: Source, sink: Sink, sel: Selection, plan: Plan | None = None) -> None:
    """Let the destination refuse a project before anything is exported (an MLflow
    database store asked for a new experiment with nowhere to keep its files), instead
    of after a long export; ``copy`` asks the same again as it writes each project."""
    check = getattr(sink, "check_project", None)
    if check is not None:
        plan = plan or Plan()
        for p in source.projects(sel):
            check(plan.project(p))


def copy(
    source: Source,
    sink: Sink,
    sel: Selection,
    *,
    workers: int = 1,
    bar: Bar | None = None,
    label: str = "runs",
    plan: Plan | None = None,
) -> Report:
    bar = bar or Bar(None)
    plan = plan or Plan()
    from trackbridge.uri import source_identity

    report = Report(source=source.describe(), destination=sink.describe())
    sink.begin(source_identity(source))
    projects = source.projects(sel)
    if sel.projects and not projects:
        raise UsageError(f"no project/experiment matches {', '.join(sel.projects)} in {source.describe()}")
    for p in projects:
        sink.write_project(plan.project(p))
    runs = source.runs(sel, projects)
    if sel.runs and not runs:
        raise UsageError(f"no run matches {', '.join(sel.runs)} in {source.describe()}")
    runs = plan.select(runs)
    if isinstance(sink, PlanningSink):
        sink.expect_runs(runs)
    task = bar.add(label, len(runs))
    read: list[str] = []

    # runs that failed here: in a destination that links a child to its parent's own id,
    # their children wait for them
    failed: set[str] = set()
    wait = bool(getattr(sink, "CHILDREN_WAIT_FOR_PARENTS", False))

    def one(row: dict[str, Any]) -> None:
        rr = report.run(row["run_key"], row.get("name"))
        parent = schema.depends_on(row)
        try:
            if wait and parent in failed:
                # written now, it would point at a parent that is not there (or only half
                # there); next time both go in, the parent first
                raise TrackbridgeError(
                    f"not written: its parent {parent} failed; it goes in with it next time"
                )
            decided = plan.skip(row)
            if decided is not None:
                rr.outcome = decided[0]
                if rr.outcome == "filtered":
                    rr.reason = decided[1]
                else:
                    rr.destination_id = decided[1]
            else:
                payload = source.read_run(row)
                read.append(row["run_key"])  # list.append is atomic: workers may share it
                why = plan.keep(payload)
                if why is not None:
                    rr.outcome, rr.reason = "filtered", why
                else:
                    payload.token = row.get(TOKEN)
                    for note in payload.source_notes:
                        rr.mapped(*note)
                    rr.outcome = sink.write_run(payload, rr)
        except TrackbridgeError as e:
            rr.outcome, rr.error = "failed", str(e)
        except Exception as e:
            rr.outcome = "failed"
            rr.error = f"{type(e).__name__}: {first_line(e)}"
            rr._traceback = traceback.format_exc()  # type: ignore[attr-defined]
        if rr.outcome == "failed":
            failed.add(row["run_key"])  # a set's add is atomic: workers may share it
        plan.done(row, rr)
        bar.advance(task, 1, rr.points)

    flush = getattr(sink, "flush", None)
    for wave in waves(runs):
        if workers <= 1:
            for row in wave:
                one(row)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tb-run") as ex:
                for f in as_completed([ex.submit(one, row) for row in wave]):
                    f.result()
        if flush is not None:
            # runs a destination held to write together are in it before what needs them:
            # the next wave's children, the artifacts and the registry
            flush()
    for art in source.artifacts(sel, projects):
        _guard(report, f"artifact {art.row['artifact_key']}", sink.write_artifact, art, report)
    reg_sel = plan.registry_selection(sel, report, read) if sel.registry else None
    if reg_sel is not None:
        failed = {r.run_key for r in report.runs if r.outcome == "failed"}
        _guard(
            report,
            "registry",
            lambda: sink.write_registry(_without(source.registry(reg_sel), failed, report), report),
        )
    sink.finish()
    for notice in sink.notices:  # e.g. duplicates another importer left, removed
        report.mapped(*notice)
    if isinstance(source, NoticingSource):  # what a source holds but does not carry
        for notice in source.notices:
            report.mapped(*notice)
    return report


def _without(reg: RegistryPayload, failed: set[str], report: Report) -> RegistryPayload:
    """Leave out the versions of runs that failed: registering one would point it at files
    that never arrived. The next run of the command registers them once the run is in."""
    if not failed or reg.model_versions.num_rows == 0:
        return reg
    keep = []
    for v in reg.model_versions.to_pylist():
        if v.get("run_key") in failed:
            report.errors.append(
                f"model version {v['model_name']} v{v['version']}: "
                f"not registered, its run {v['run_key']} failed"
            )
        else:
            keep.append(v)
    return RegistryPayload(reg.registered_models, schema.table("model_versions", keep))


def _guard(report: Report, what: str, fn: Any, *args: Any) -> None:
    """Record a failure as one line in the report instead of stopping the whole copy."""
    try:
        fn(*args)
    except TrackbridgeError as e:
        report.errors.append(f"{what}: {e}")
    except Exception as e:  # reported; the exit code says partial
        report.errors.append(f"{what}: {type(e).__name__}: {first_line(e)}")
