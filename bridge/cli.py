"""The ``trackbridge`` command.

Every command reads through a Source and writes through a Sink (see bridge.model), so
options mean the same thing everywhere. Errors a user can act on print one line and
exit with a documented code (bridge.errors.ExitCode, docs/cli.md); ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bridge import __version__, engine
from bridge.errors import ExitCode, TrackbridgeError, UsageError, first_line
from bridge.model import Selection
from bridge.progress import progress
from bridge.report import Report

EPILOG_URIS = """\b
Sources and destinations:
  mlflow+http://HOST:PORT      an MLflow tracking server
  mlflow+sqlite:////ABS/PATH.db an MLflow SQLite store, used in-process
  mlflow+postgresql://…        an MLflow database store, used in-process
  wandb+offline:///ABS/PATH    W&B offline run folders (read, or written for wandb sync)
  wandb://ENTITY/PROJECT       W&B online (read; WANDB_API_KEY from the environment)
  PATH or bundle:///PATH       a trackbridge bundle folder
Credentials come from the environment (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, …),
never from a URI.
"""


class _State:
    debug = False


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


def _selection(kw: dict[str, Any]) -> Selection:
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


def workers_option(f: Any) -> Any:
    return click.option(
        "--workers",
        type=click.IntRange(1, 64),
        default=None,
        help="Runs copied in parallel. Default: 4 for servers, 1 for local stores and folders.",
    )(f)


def _workers(n: int | None, *uris: str) -> int:
    if n is not None:
        return n
    local = ("mlflow+sqlite", "mlflow+file", "wandb+offline", "neptune")
    return 4 if all(not u.startswith(local) for u in uris) else 1


def _finish(report: Report, report_path: str | None, quiet: bool = False) -> int:
    if report_path:
        report.write(report_path)
    if not quiet:
        for line in report.summary_lines():
            click.echo(line)
    for r in report.runs:
        if r.outcome == "failed":
            click.echo(f"trackbridge: run {r.run_key} failed: {r.error}", err=True)
            if _State.debug and getattr(r, "_traceback", None):
                click.echo(r._traceback, err=True)  # type: ignore[attr-defined]
    return ExitCode.PARTIAL if report.failed else ExitCode.OK


@click.group(epilog=EPILOG_URIS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trackbridge")
@click.option("--debug", is_flag=True, envvar="TRACKBRIDGE_DEBUG", help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """Move experiment-tracking data between MLflow, W&B and Neptune, losing nothing.

    \b
    Typical use:
      trackbridge migrate mlflow+http://old:5000 mlflow+http://new:5000
      trackbridge verify  mlflow+http://old:5000 mlflow+http://new:5000
    Exit codes: 0 done, 1 partial (some runs failed), 2 usage, 3 bad input,
    4 verify found differences, 5 destination error, 130 interrupted.
    """
    _State.debug = debug


@cli.command("export", epilog=EPILOG_URIS)
@click.argument("src")
@click.argument("bundle")
@selection_options
@workers_option
@report_option
def export_cmd(src: str, bundle: str, workers: int | None, report_path: str | None, **kw: Any) -> None:
    """Read SRC into a bundle folder (Parquet + blobs + manifest).

    Running it again into the same bundle rewrites each run atomically; a run whose
    export was killed half-way is invisible to readers until it is written again.
    """
    from bridge.bundle import BundleWriter
    from bridge.uri import open_source, parse

    target = parse(bundle)
    if target.scheme != "bundle":
        raise UsageError(f"{target.safe}: export writes a bundle folder; `migrate` writes into a tracker")
    sel = _selection(kw)
    source = open_source(src)
    sink = BundleWriter(target.inner)
    with progress() as bar:
        report = engine.copy(source, sink, sel, workers=_workers(workers, src), bar=bar, label="export")
    click.echo(f"bundle written: {sink.root.resolve()}")
    sys.exit(_finish(report, report_path))


@cli.command("import", epilog=EPILOG_URIS)
@click.argument("bundle")
@click.argument("dest")
@selection_options
@workers_option
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@report_option
def import_cmd(
    bundle: str, dest: str, workers: int | None, dry_run: bool, report_path: str | None, **kw: Any
) -> None:
    """Write a bundle into DEST. Safe to repeat: nothing is ever duplicated."""
    from bridge.uri import open_sink, open_source

    sel = _selection(kw)
    source = open_source(bundle)
    sink = open_sink(dest, **({"dry_run": True} if dry_run else {}))
    with progress() as bar:
        report = engine.copy(source, sink, sel, workers=_workers(workers, dest), bar=bar, label="import")
    if dry_run:
        click.echo("dry run: nothing was written")
    sys.exit(_finish(report, report_path))


@cli.command("migrate", epilog=EPILOG_URIS)
@click.argument("src")
@click.argument("dest")
@selection_options
@workers_option
@click.option(
    "--bundle",
    "bundle_path",
    type=click.Path(file_okay=False),
    help="Keep the intermediate bundle here (default: a temporary folder, removed after).",
)
@click.option("--dry-run", is_flag=True, help="Export, then show what the import would change.")
@click.option(
    "--verify/--no-verify",
    "do_verify",
    default=True,
    show_default=True,
    help="Compare source and destination afterwards.",
)
@report_option
def migrate_cmd(
    src: str,
    dest: str,
    workers: int | None,
    bundle_path: str | None,
    dry_run: bool,
    do_verify: bool,
    report_path: str | None,
    **kw: Any,
) -> None:
    """Copy SRC into DEST through a bundle, then verify.

    Safe to repeat: runs already copied and unchanged cost no writes, and runs that a
    killed migration left half-done are completed, never duplicated.
    """
    sel = _selection(kw)
    code = run_migrate(
        src,
        dest,
        sel,
        workers=workers,
        bundle_path=bundle_path,
        dry_run=dry_run,
        do_verify=do_verify and not dry_run,
        report_path=report_path,
    )
    sys.exit(code)


def run_migrate(
    src: str,
    dest: str,
    sel: Selection,
    *,
    workers: int | None = None,
    bundle_path: str | None = None,
    dry_run: bool = False,
    do_verify: bool = True,
    report_path: str | None = None,
) -> int:
    from bridge.bundle import BundleWriter
    from bridge.uri import open_sink, open_source, parse

    parse(dest)  # fail on a bad destination before reading anything
    source = open_source(src)
    tmp = None
    if bundle_path is None:
        tmp = tempfile.mkdtemp(prefix="trackbridge-bundle-")
        bundle_path = tmp
    try:
        with progress() as bar:
            exp = engine.copy(
                source,
                BundleWriter(bundle_path),
                sel,
                workers=_workers(workers, src),
                bar=bar,
                label="export",
            )
        failed_exports = [r for r in exp.runs if r.outcome == "failed"]
        sink = open_sink(dest, **({"dry_run": True} if dry_run else {}))
        bundle_sel = Selection(registry=sel.registry)
        with progress() as bar:
            report = engine.copy(
                open_source(bundle_path),
                sink,
                bundle_sel,
                workers=_workers(workers, dest),
                bar=bar,
                label="import",
            )
        report.source = source.describe()
        report.runs += failed_exports
        code = _finish(report, report_path)
        if dry_run:
            click.echo("dry run: nothing was written to the destination")
            return code
        if do_verify:
            vcode = run_verify(src, dest, sel)
            code = code or vcode
        return code
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


@cli.command("verify", epilog=EPILOG_URIS)
@click.argument("src")
@click.argument("dest")
@selection_options
@click.option("--limit", default=200, show_default=True, help="Differences to print at most.")
def verify_cmd(src: str, dest: str, limit: int, **kw: Any) -> None:
    """Compare every field of SRC with DEST; exit 4 on any difference.

    Runs are matched by the source key trackbridge stores with each copy, so DEST may
    also hold other data. Artifact files are compared by size and SHA-256.
    """
    sys.exit(run_verify(src, dest, _selection(kw), limit=limit))


def run_verify(src: str, dest: str, sel: Selection, limit: int = 200) -> int:
    from bridge.uri import open_source
    from bridge.verify import verify

    a, b = open_source(src), open_source(dest)
    with progress() as bar:
        diffs, stats = verify(a, b, sel, bar=bar, limit=limit)
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


@cli.command("inspect")
@click.argument("bundle")
@click.option("--check", is_flag=True, help="Re-hash every file and blob against the manifest.")
@click.option("--runs", "show_runs", default=20, show_default=True, help="Runs to list.")
def inspect_cmd(bundle: str, check: bool, show_runs: int) -> None:
    """Summarise a bundle: schema version, source, counts; --check verifies every byte."""
    from bridge.bundle import BundleSource
    from bridge.uri import parse

    t = parse(bundle)
    if t.scheme != "bundle":
        raise UsageError(f"{t.safe}: inspect reads bundles; export a tracker first")
    src = BundleSource(t.inner, verify_checksums=check)
    m = src.manifest
    click.echo(f"bundle:         {src.root.resolve()}")
    click.echo(f"schema version: {m['schema_version']}   producer: {m.get('producer')}")
    click.echo(f"source:         {m.get('source')}")
    click.echo(f"written at:     {m.get('written_at')}   complete: {m.get('complete')}")
    click.echo("tables:")
    for name, n in m.get("counts", {}).items():
        if n:
            click.echo(f"  {name:<18} {n:>12,} rows")
    blobs = m.get("blobs", {})
    click.echo(f"blobs:          {blobs.get('count', 0):,} files, {blobs.get('bytes', 0):,} bytes")
    runs = src.runs(Selection(), src.projects(Selection()))
    for r in runs[:show_runs]:
        click.echo(f"  run {r['source_id']}  {r.get('name')!s:<30} {r.get('status')}  {r.get('start_time')}")
    if len(runs) > show_runs:
        click.echo(f"  … {len(runs) - show_runs} more runs")
    if not src.complete:
        click.echo("warning: this bundle's export did not finish; only complete runs are shown", err=True)
    if check:
        problems = src.check()
        for p in problems:
            click.echo(f"BAD {p}", err=True)
        if problems:
            sys.exit(ExitCode.BAD_INPUT)
        click.echo("check: every file and blob matches its checksum")


@cli.command("quickstart")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False),
    default="trackbridge-quickstart",
    show_default=True,
    help="Where the demo source, the bundle and the destination store go.",
)
@click.option(
    "--source",
    type=click.Choice(["wandb", "mlflow"]),
    default="wandb",
    show_default=True,
    help="Demo source: W&B offline runs (the nightly-sync case) or an MLflow store.",
)
def quickstart_cmd(folder: str, source: str) -> None:
    """Make demo runs with a tracker's real SDK, migrate them into SQLite, verify.

    The default demo is a set of W&B offline runs written by the wandb SDK, with no
    account and no network: config, history with NaN, images, a histogram, a table,
    a model artifact with aliases, a failed run and a resumed one. They land in a local
    SQLite MLflow store, the model artifact as a registered model version with its
    aliases (as --register-models does); no server is needed. Run it twice: the second
    run copies nothing new.
    """
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    dest_db = root / "dest.db"
    if source == "wandb":
        from bridge.demo_wandb import make_wandb_demo

        demo = root / "wandb-demo"
        src = f"wandb+offline://{demo / 'wandb'}"
        if not (demo / "wandb").is_dir():
            click.echo(f"1/3 writing demo W&B offline runs with the wandb SDK: {demo}")
            make_wandb_demo(demo)
        else:
            click.echo(f"1/3 reusing the demo W&B offline runs in {demo}")
    else:
        from bridge.demo import make_mlflow_demo

        src_db = root / "source.db"
        src = f"mlflow+sqlite:///{src_db}"
        if not src_db.exists():
            click.echo(f"1/3 making a demo MLflow store with the mlflow SDK: {src_db}")
            make_mlflow_demo(f"sqlite:///{src_db}")
        else:
            click.echo(f"1/3 reusing the demo MLflow store {src_db}")
    bundle = root / f"bundle-{source}"
    click.echo(f"2/3 migrating it into {dest_db} (through {bundle})")
    dest = f"mlflow+sqlite:///{dest_db}"
    # the nightly-sync case: W&B model artifacts are promoted into the Model Registry
    sel = Selection(register_models=source == "wandb")
    code = run_migrate(src, dest, sel, bundle_path=str(bundle), do_verify=False)
    click.echo("3/3 verifying every field")
    vcode = run_verify(src, dest, sel)
    code = code or vcode
    click.echo("\nOpen the result in the MLflow UI:")
    click.echo(f"  mlflow ui --backend-store-uri sqlite:///{dest_db} --port 5000")
    click.echo(f"Look at the bundle: trackbridge inspect {bundle}")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        cli.main(args=argv, prog_name="trackbridge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("trackbridge: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(ExitCode.USAGE)
    except TrackbridgeError as e:
        if _State.debug:
            traceback.print_exc()
        click.echo(f"trackbridge: error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("trackbridge: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except SystemExit:
        raise
    except Exception as e:
        if _State.debug:
            traceback.print_exc()
        click.echo(
            f"trackbridge: error: {type(e).__name__}: {first_line(e)} (run with --debug for details)",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)


if __name__ == "__main__":  # pragma: no cover
    main()
