"""What every ``trackbridge`` command shares: the URI list of ``--help``, the filter,
report and workers options, one-line errors with ``--debug`` tracebacks (scrubbed of
credentials), the run summary, and ``verify`` as the commands run it.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from trackbridge.errors import ExitCode, TrackbridgeError, UsageError
from trackbridge.model import Selection
from trackbridge.progress import progress
from trackbridge.report import Report, scrub


def _epilog() -> str:
    """Every URI form the installed trackers declare, a plug-in's included."""
    from trackbridge import tracker

    try:
        listed = tracker.uri_help()
    except TrackbridgeError as e:
        listed = f"  (the installed trackers cannot be listed: {e})"
    return (
        "\b\nSources and destinations:\n"
        + listed
        + "\nCredentials come from the environment (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, …),\n"
        "never from a URI.\n"
    )


EPILOG_URIS = _epilog()


class DebugState:
    debug = False


def debug_traceback() -> None:
    """With --debug, the traceback of the error being handled, chained causes included,
    with every credential scrubbed: users paste it into bug reports."""
    if DebugState.debug:
        click.echo(scrub(traceback.format_exc()), err=True)


def check_report_path(report_path: str | None) -> None:
    """A report that cannot be written is found out before the work, not after it."""
    if report_path:
        folder = Path(report_path).expanduser().resolve().parent
        if not folder.is_dir():
            raise UsageError(f"--report {report_path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"--report {report_path}: cannot write into {folder}")


@contextlib.contextmanager
def reporting(report_path: str | None, src: str, dest: str) -> Iterator[None]:
    """If the command fails before it has a report of its own (a source that cannot be
    read, a destination that refuses), ``--report`` still gets one, saying why."""
    check_report_path(report_path)
    try:
        yield
    except Exception as e:
        if report_path:
            from trackbridge.uri import redact

            failed = Report(source=redact(src), destination=redact(dest))
            failed.errors.append(str(e) if isinstance(e, TrackbridgeError) else f"{type(e).__name__}: {e}")
            with contextlib.suppress(OSError):
                failed.write(report_path)
        raise


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as e:
        raise UsageError(f"--since/--until: {value!r} is not an ISO date or time (e.g. 2026-01-31)") from e
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def selection_options(f: Any) -> Any:
    opts = [
        click.option(
            "--experiment",
            "--project",
            "projects",
            multiple=True,
            metavar="NAME|ID",
            help="Only this experiment/project (repeatable).",
        ),
        click.option(
            "--run",
            "runs",
            multiple=True,
            metavar="ID",
            help="Only this run, by source id or run key (repeatable).",
        ),
        click.option("--since", metavar="DATE", help="Only runs started at or after DATE (ISO 8601, UTC)."),
        click.option("--until", metavar="DATE", help="Only runs started before DATE."),
        click.option("--skip-deleted", is_flag=True, help="Leave out deleted runs and experiments."),
        click.option("--no-registry", is_flag=True, help="Leave out the model registry."),
        click.option(
            "--register-models",
            is_flag=True,
            help="W&B sources: make every artifact of type 'model' a registered model version "
            "(named after the artifact, its aliases kept), on top of any registry links.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def selection_of(kw: dict[str, Any]) -> Selection:
    return Selection(
        projects=tuple(kw.pop("projects", ()) or ()),
        runs=tuple(kw.pop("runs", ()) or ()),
        since=_when(kw.pop("since", None)),
        until=_when(kw.pop("until", None)),
        include_deleted=not kw.pop("skip_deleted", False),
        registry=not kw.pop("no_registry", False),
        register_models=kw.pop("register_models", False),
    )


def report_option(f: Any) -> Any:
    return click.option(
        "--report",
        "report_path",
        type=click.Path(dir_okay=False),
        help="Write the full report (per-run outcome, mappings, errors) as JSON here.",
    )(f)


def artifact_root_option(f: Any) -> Any:
    return click.option(
        "--artifact-root",
        metavar="URI",
        help="MLflow destinations: where new experiments keep their files, as "
        "'mlflow server --default-artifact-root' takes it (a folder, s3://, gs://, ...). "
        "Needed for a new experiment in a PostgreSQL or MySQL store used in-process. "
        "[default: an existing experiment's own location; beside an SQLite file]",
    )(f)


def workers_option(f: Any) -> Any:
    return click.option(
        "--workers",
        type=click.IntRange(1, 64),
        default=None,
        help="Runs copied in parallel. Default: 4 for servers and databases, 1 for SQLite "
        "and file stores and folders.",
    )(f)


def workers_for(n: int | None, *uris: str) -> int:
    from trackbridge.uri import default_workers

    return n if n is not None else default_workers(*uris)


def finish(report: Report, report_path: str | None, quiet: bool = False) -> int:
    if report_path:
        report.write(report_path)
    if not quiet:
        for line in report.summary_lines():
            click.echo(line)
    for r in report.runs:
        if r.outcome == "failed":
            click.echo(scrub(f"trackbridge: run {r.run_key} failed: {r.error}"), err=True)
            if DebugState.debug and getattr(r, "_traceback", None):
                click.echo(scrub(r._traceback), err=True)  # type: ignore[attr-defined]
    return ExitCode.PARTIAL if report.failed else ExitCode.OK


def run_verify(src: str, dest: str, sel: Selection, limit: int = 200) -> int:
    from trackbridge.tracker import coarsest_ms
    from trackbridge.uri import open_source, parse
    from trackbridge.verify import verify

    a, b = open_source(src), open_source(dest)
    # a bundle keeps what its source kept: compare at the trackers' own precision
    precision = coarsest_ms(t.name for t in (parse(src), parse(dest)))
    with progress() as bar:
        diffs, stats = verify(a, b, sel, bar=bar, limit=limit, precision_ms=precision)
    checked = (
        f"{stats.get('projects', 0)} projects, {stats.get('runs', 0)} runs, "
        f"{stats.get('points', 0):,} points, {stats.get('model_versions', 0)} model versions"
    )
    if diffs:
        for d in diffs:
            click.echo(f"DIFF {d}")
        n = stats.get("differences", len(diffs))
        click.echo(f"verify: {n} difference(s) in {checked}", err=True)
        return ExitCode.DIFFERENT
    click.echo(f"verify: identical ({checked})")
    return ExitCode.OK
