"""The ``trackbridge`` command.

Every command reads through a Source and writes through a Sink (see trackbridge.model), so
options mean the same thing everywhere. Errors a user can act on print one line and
exit with a documented code (trackbridge.errors.ExitCode, docs/cli.md); ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click
from trackbridge import engine
from trackbridge.cli_common import (
    EPILOG_URIS,
    DebugState,
    artifact_root_option,
    debug_traceback,
    finish,
    report_option,
    reporting,
    run_verify,
    selection_of,
    selection_options,
    workers_for,
    workers_option,
)
from trackbridge.cli_sync import sync_cmd
from trackbridge.errors import ExitCode, TrackbridgeError, UsageError, first_line
from trackbridge.model import Selection
from trackbridge.progress import progress
from trackbridge.report import scrub
from trackbridge.version import __version__


@click.group(epilog=EPILOG_URIS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trackbridge")
@click.option("--debug", is_flag=True, envvar="TRACKBRIDGE_DEBUG", help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """Move experiment-tracking data between MLflow, W&B and Neptune, losing nothing.

    \b
    Typical use:
      trackbridge migrate mlflow+http://old:5000 mlflow+http://new:5000
      trackbridge verify  mlflow+http://old:5000 mlflow+http://new:5000
      trackbridge sync    wandb://acme/research mlflow+http://prod:5000 --register-models
    Exit codes: 0 done, 1 partial (some runs failed), 2 usage, 3 bad input,
    4 verify found differences, 5 destination error, 75 sync already running,
    130 interrupted.
    """
    DebugState.debug = debug


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
    from trackbridge.bundle import BundleWriter
    from trackbridge.uri import check_destination, open_source, parse

    target = parse(bundle)
    if target.name != "bundle":
        raise UsageError(f"{target.safe}: export writes a bundle folder; `migrate` writes into a tracker")
    sel = selection_of(kw)
    with reporting(report_path, src, bundle):
        check_destination(target)
        source = open_source(src)
        sink = BundleWriter(target.inner)
        with progress() as bar:
            n = workers_for(workers, src)
            report = engine.copy(source, sink, sel, workers=n, bar=bar, label="export")
    click.echo(f"bundle written: {sink.root.resolve()}")
    sys.exit(finish(report, report_path))


@cli.command("import", epilog=EPILOG_URIS)
@click.argument("bundle")
@click.argument("dest")
@selection_options
@workers_option
@artifact_root_option
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@report_option
def import_cmd(
    bundle: str,
    dest: str,
    workers: int | None,
    artifact_root: str | None,
    dry_run: bool,
    report_path: str | None,
    **kw: Any,
) -> None:
    """Write a bundle into DEST. Safe to repeat: nothing is ever duplicated."""
    from trackbridge.uri import open_sink, open_source

    sel = selection_of(kw)
    with reporting(report_path, bundle, dest):
        source = open_source(bundle)
        sink = open_sink(dest, dry_run=dry_run or None, artifact_root=artifact_root)
        with progress() as bar:
            n = workers_for(workers, dest)
            report = engine.copy(source, sink, sel, workers=n, bar=bar, label="import")
    if dry_run:
        click.echo("dry run: nothing was written")
    sys.exit(finish(report, report_path))


@cli.command("migrate", epilog=EPILOG_URIS)
@click.argument("src")
@click.argument("dest")
@selection_options
@workers_option
@artifact_root_option
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
    artifact_root: str | None,
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
    sel = selection_of(kw)
    code = run_migrate(
        src,
        dest,
        sel,
        workers=workers,
        bundle_path=bundle_path,
        dry_run=dry_run,
        do_verify=do_verify and not dry_run,
        report_path=report_path,
        artifact_root=artifact_root,
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
    artifact_root: str | None = None,
) -> int:
    from trackbridge.files import owned_temp_dir

    with reporting(report_path, src, dest), contextlib.ExitStack() as stack:
        if bundle_path is None:
            bundle_path = str(stack.enter_context(owned_temp_dir("trackbridge-migrate-")) / "bundle")
        code = _migrate(src, dest, sel, workers, bundle_path, dry_run, report_path, artifact_root)
    if not dry_run and do_verify:
        code = code or run_verify(src, dest, sel)
    return code


def _migrate(
    src: str,
    dest: str,
    sel: Selection,
    workers: int | None,
    bundle_path: str,
    dry_run: bool,
    report_path: str | None,
    artifact_root: str | None = None,
) -> int:
    from trackbridge.bundle import BundleWriter
    from trackbridge.uri import open_sink, open_source, source_identity

    # The destination is opened and asked first: a dead server, a read-only folder or a
    # missing driver is found in seconds, not after the whole export.
    sink = open_sink(dest, dry_run=dry_run or None, artifact_root=artifact_root)
    source = open_source(src)
    sink.begin(source_identity(source))
    engine.check_projects(source, sink, sel)
    with progress() as bar:
        exp = engine.copy(
            source, BundleWriter(bundle_path), sel, workers=workers_for(workers, src), bar=bar, label="export"
        )
    with progress() as bar:
        report = engine.copy(
            open_source(bundle_path),
            sink,
            Selection(registry=sel.registry),
            workers=workers_for(workers, dest),
            bar=bar,
            label="import",
        )
    report.source = source.describe()
    # what the export noted about a run (a source file cut short) belongs to its import
    by_key = {r.run_key: r for r in report.runs}
    for er in exp.runs:
        ir = by_key.get(er.run_key)
        if er.outcome == "failed":
            report.runs.append(er)
        elif ir is not None and er.mappings:
            ir.mappings[:0] = [m for m in er.mappings if m not in ir.mappings]
    report.other_mappings[:0] = [m for m in exp.other_mappings if m not in report.other_mappings]
    report.errors[:0] = [f"export: {e}" for e in exp.errors]
    code = finish(report, report_path)
    if dry_run:
        click.echo("dry run: nothing was written to the destination")
    return code


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
    sys.exit(run_verify(src, dest, selection_of(kw), limit=limit))


@cli.command("inspect")
@click.argument("bundle")
@click.option("--check", is_flag=True, help="Re-hash every file and blob against the manifest.")
@click.option("--runs", "show_runs", default=20, show_default=True, help="Runs to list.")
def inspect_cmd(bundle: str, check: bool, show_runs: int) -> None:
    """Summarise a bundle: schema version, source, counts; --check verifies every byte."""
    from trackbridge.bundle_reader import BundleSource
    from trackbridge.uri import parse

    t = parse(bundle)
    if t.name != "bundle":
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


def _demo_sources() -> list[str]:
    from trackbridge import tracker

    try:
        return [t.name for t in tracker.registry() if t.demo is not None]
    except TrackbridgeError:
        return ["wandb", "mlflow"]


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
    type=click.Choice(_demo_sources()),
    default="wandb",
    show_default=True,
    help="Demo source, written with that tracker's own SDK: W&B offline runs (the nightly-sync case) "
    "or an MLflow store.",
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
    from trackbridge import tracker

    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    dest_db = root / "dest.db"
    demo = tracker.by_name(source).demo
    assert demo is not None  # the choice offers only trackers with a demo
    src = demo(root, lambda text: click.echo(f"1/3 {text}"))
    bundle = root / f"bundle-{source}"
    click.echo(f"2/3 migrating it into {dest_db} (through {bundle})")
    dest = f"mlflow+sqlite:///{dest_db}"
    # the nightly-sync case: W&B model artifacts are promoted into the Model Registry
    sel = Selection(register_models=True)
    code = run_migrate(src, dest, sel, bundle_path=str(bundle), do_verify=False)
    click.echo("3/3 verifying every field")
    vcode = run_verify(src, dest, sel)
    code = code or vcode
    click.echo("\nOpen the result in the MLflow UI:")
    click.echo(f"  mlflow ui --backend-store-uri sqlite:///{dest_db} --port 5000")
    click.echo(f"Look at the bundle: trackbridge inspect {bundle}")
    flag = " --register-models" if sel.register_models else ""
    click.echo(
        f"Keep it up to date every night (only what changed moves): trackbridge sync {src} {dest}{flag}"
    )
    sys.exit(code)


cli.add_command(sync_cmd)


def main(argv: list[str] | None = None) -> None:
    from trackbridge import tracker

    with contextlib.suppress(TrackbridgeError):  # a broken plug-in is reported by the command
        tracker.prepare_process()
    try:
        cli.main(args=argv, prog_name="trackbridge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("trackbridge: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(ExitCode.USAGE)
    except TrackbridgeError as e:
        debug_traceback()
        click.echo(f"trackbridge: error: {scrub(e.message)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("trackbridge: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except SystemExit:
        raise
    except Exception as e:
        debug_traceback()
        click.echo(
            f"trackbridge: error: {type(e).__name__}: {scrub(first_line(e))} (run with --debug for details)",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)


if __name__ == "__main__":  # pragma: no cover
    main()
