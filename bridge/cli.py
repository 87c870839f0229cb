"""The ``trackbridge`` command.

Every command reads through a Source and writes through a Sink (see bridge.model), so
options mean the same thing everywhere. Errors a user can act on print one line and
exit with a documented code (bridge.errors.ExitCode, docs/cli.md); ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bridge import __version__, engine
from bridge.errors import ExitCode, TrackbridgeError, UsageError, first_line
from bridge.model import Selection
from bridge.progress import progress
from bridge.report import Report, scrub

EPILOG_URIS = """\b
Sources and destinations:
  mlflow+http://HOST:PORT      an MLflow tracking server
  mlflow+sqlite:////ABS/PATH.db an MLflow SQLite store, used in-process
  mlflow+postgresql://…        an MLflow database store, used in-process
  wandb+offline:///ABS/PATH    W&B offline run folders (read, or written for wandb sync)
  wandb://ENTITY[/PROJECT]     W&B online (WANDB_API_KEY from the environment); with
                               no PROJECT, every project of ENTITY, by its own name
  neptune+offline:///ABS/PATH  a .neptune folder of neptune 1.x or neptune-scale (read
                               only; add ?project=WS/NAME for 1.x runs, which lack it)
  neptune-exporter:///ABS/PATH Parquet + files written by Neptune's exporter (read only)
  spool:///ABS/PATH            the dual-logging shim's spool (read only: replay it)
  PATH or bundle:///PATH       a trackbridge bundle folder
Credentials come from the environment (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, …),
never from a URI.
"""


class _State:
    debug = False


def _debug_traceback() -> None:
    """With --debug, the traceback of the error being handled, chained causes included,
    with every credential scrubbed: users paste it into bug reports."""
    if _State.debug:
        click.echo(scrub(traceback.format_exc()), err=True)


def _check_report_path(report_path: str | None) -> None:
    """A report that cannot be written is found out before the work, not after it."""
    if report_path:
        folder = Path(report_path).expanduser().resolve().parent
        if not folder.is_dir():
            raise UsageError(f"--report {report_path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"--report {report_path}: cannot write into {folder}")


@contextlib.contextmanager
def _reporting(report_path: str | None, src: str, dest: str) -> Iterator[None]:
    """If the command fails before it has a report of its own (a source that cannot be
    read, a destination that refuses), ``--report`` still gets one, saying why."""
    _check_report_path(report_path)
    try:
        yield
    except Exception as e:
        if report_path:
            from bridge.uri import redact

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
    from bridge.uri import default_workers

    return n if n is not None else default_workers(*uris)


def _finish(report: Report, report_path: str | None, quiet: bool = False) -> int:
    if report_path:
        report.write(report_path)
    if not quiet:
        for line in report.summary_lines():
            click.echo(line)
    for r in report.runs:
        if r.outcome == "failed":
            click.echo(scrub(f"trackbridge: run {r.run_key} failed: {r.error}"), err=True)
            if _State.debug and getattr(r, "_traceback", None):
                click.echo(scrub(r._traceback), err=True)  # type: ignore[attr-defined]
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
      trackbridge sync    wandb://acme/research mlflow+http://prod:5000 --register-models
    Exit codes: 0 done, 1 partial (some runs failed), 2 usage, 3 bad input,
    4 verify found differences, 5 destination error, 75 sync already running,
    130 interrupted.
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
    from bridge.uri import check_destination, open_source, parse

    target = parse(bundle)
    if target.scheme != "bundle":
        raise UsageError(f"{target.safe}: export writes a bundle folder; `migrate` writes into a tracker")
    sel = _selection(kw)
    with _reporting(report_path, src, bundle):
        check_destination(target)
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
    with _reporting(report_path, bundle, dest):
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
    from bridge.files import owned_temp_dir

    with _reporting(report_path, src, dest), contextlib.ExitStack() as stack:
        if bundle_path is None:
            bundle_path = str(stack.enter_context(owned_temp_dir("trackbridge-migrate-")) / "bundle")
        code = _migrate(src, dest, sel, workers, bundle_path, dry_run, report_path)
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
) -> int:
    from bridge.bundle import BundleWriter
    from bridge.uri import open_sink, open_source, source_identity

    # The destination is opened and asked first: a dead server, a read-only folder or a
    # missing driver is found in seconds, not after the whole export.
    sink = open_sink(dest, **({"dry_run": True} if dry_run else {}))
    source = open_source(src)
    sink.begin(source_identity(source))
    with progress() as bar:
        exp = engine.copy(
            source, BundleWriter(bundle_path), sel, workers=_workers(workers, src), bar=bar, label="export"
        )
    with progress() as bar:
        report = engine.copy(
            open_source(bundle_path),
            sink,
            Selection(registry=sel.registry),
            workers=_workers(workers, dest),
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
    report.errors[:0] = [f"export: {e}" for e in exp.errors]
    code = _finish(report, report_path)
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


SYNC_HELP = """Copy what is new or changed in SRC into DEST; made to run every night.

\b
  trackbridge sync wandb://acme/research mlflow+https://mlflow.acme.internal --register-models
  trackbridge sync --config /etc/trackbridge/sync.toml
  trackbridge sync SRC DEST --shard 3/8          (one of 8 machines or tasks)

A run unchanged since the last sync is skipped without being read (its change token is
kept on the destination run); a changed run gets only its new points and fields; a new
run is added. Safe to kill at any moment: the next sync completes the work and never
duplicates a run, a point or a model version. Two syncs of one pair never overlap.

\b
Exit codes: 0 all done; 1 partial (some runs failed: see the report);
2 usage or configuration error; 3 bad input; 5 destination unreachable;
4 --verify found differences; 75 another sync of the same pair is running.
See docs/sync.md for the config file, cron and Airflow examples, and recovery.
"""


@cli.command("sync", help=SYNC_HELP, epilog=EPILOG_URIS)
@click.argument("src", required=False)
@click.argument("dest", required=False)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="A sync.toml with one or more [[pair]]s, filters, naming and registry rules.",
)
@click.option("--pair", "pair_names", multiple=True, metavar="NAME", help="With --config: only this pair.")
@selection_options
@click.option("--tag", "tags", multiple=True, help="Only runs with this W&B tag / label (repeatable: any).")
@click.option("--exclude-tag", "exclude_tags", multiple=True, help="Leave out runs with this tag.")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["running", "finished", "failed", "crashed", "killed"]),
    help="Only runs in this state (repeatable).",
)
@click.option(
    "--updated-since", metavar="DATE|AGE", help="Only runs changed since DATE or within AGE (36h, 7d)."
)
@click.option(
    "--experiment-name",
    metavar="TEMPLATE",
    help="Destination experiment names from source projects: '{project}' (default), "
    "'wandb/{entity}/{project}'.",
)
@workers_option
@click.option("--shard", metavar="K/N", help="Copy only shard K of N (a stable hash of each run family).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help="Lock, remembered filter decisions, deltas. [default: $TRACKBRIDGE_STATE_DIR or "
    "~/.local/state/trackbridge]",
)
@click.option(
    "--deltas/--no-deltas", default=None, help="Keep what moved as a dated bundle (replay: import)."
)
@click.option(
    "--delta-dir", type=click.Path(file_okay=False), help="Where delta bundles go [default: STATE_DIR]."
)
@click.option(
    "--keep-deltas", type=click.IntRange(0), metavar="DAYS", help="Delete deltas older than this [30]."
)
@click.option("--full", is_flag=True, help="Read every run, even those whose change token says unchanged.")
@click.option(
    "--verify", "do_verify", is_flag=True, help="Compare the synced runs field by field afterwards."
)
@click.option("--retries", type=click.IntRange(1), metavar="N", help="Attempts per request in all [8].")
@click.option(
    "--retry-max-wait", type=click.FloatRange(0), metavar="SECONDS", help="Longest single wait [60]."
)
@click.option("--quiet", is_flag=True, help="Print only failures.")
@report_option
def sync_cmd(src: str | None, dest: str | None, config_path: str | None, **kw: Any) -> None:
    sys.exit(run_sync(src, dest, config_path, **kw))


def run_sync(src: str | None, dest: str | None, config_path: str | None, **kw: Any) -> int:
    from bridge import retry
    from bridge import sync as sy

    settings: dict[str, Any] = {}
    retry_cfg: dict[str, Any] = {}
    if config_path:
        if src or dest:
            raise UsageError("give either SRC DEST or --config, not both")
        pairs, settings, retry_cfg = sy.load_config(config_path)
        if kw["pair_names"]:
            unknown = sorted(set(kw["pair_names"]) - {p.name for p in pairs})
            if unknown:
                raise UsageError(f"--pair {unknown[0]!r}: not in {config_path}")
            pairs = [p for p in pairs if p.name in kw["pair_names"]]
        ignored = [o for o in ("tags", "exclude_tags", "states", "projects", "runs") if kw.get(o)]
        if ignored or kw.get("updated_since") or kw.get("experiment_name"):
            raise UsageError("with --config, put filters and naming in the config file's [pair.filter]")
    else:
        if not (src and dest):
            raise UsageError("sync needs SRC and DEST, or --config FILE (see trackbridge sync --help)")
        sel = _selection(kw)
        if kw.get("experiment_name"):
            sy.check_template(kw["experiment_name"], "--experiment-name")
        pairs = [
            sy.Pair(
                source=src,
                destination=dest,
                experiment=kw.get("experiment_name"),
                registry=sel.registry,
                register_models=sel.register_models,
                filters=sy.Filters(
                    projects=sel.projects,
                    runs=sel.runs,
                    tags=tuple(kw["tags"]),
                    exclude_tags=tuple(kw["exclude_tags"]),
                    states=tuple(kw["states"]),
                    started_since=sel.since,
                    updated_since=sy.parse_when(kw.get("updated_since"), "--updated-since"),
                ),
            )
        ]
    retry.configure(
        attempts=kw.get("retries") or retry_cfg.get("attempts"),
        initial=retry_cfg.get("initial_wait"),
        maximum=kw.get("retry_max_wait")
        if kw.get("retry_max_wait") is not None
        else retry_cfg.get("max_wait"),
    )

    def pick(name: str, default: Any) -> Any:
        return kw.get(name) if kw.get(name) is not None else settings.get(name, default)

    state_dir = pick("state_dir", None)
    delta_dir = pick("delta_dir", None)
    opts = sy.Options(
        state_dir=Path(state_dir).expanduser() if state_dir else sy.default_state_dir(),
        workers=pick("workers", None),
        shard=sy.parse_shard(kw.get("shard")),
        deltas=bool(pick("deltas", False)),
        delta_dir=Path(delta_dir).expanduser() if delta_dir else None,
        keep_deltas=int(pick("keep_deltas", 30)),
        full=kw.get("full", False),
        verify=bool(kw.get("do_verify") or settings.get("verify", False)),
        report=kw.get("report_path") or settings.get("report"),
        quiet=kw.get("quiet", False),
    )
    started = datetime.now(UTC)
    results = []
    code = ExitCode.OK
    for pair in pairs:
        if not opts.quiet:
            click.echo(f"sync {pair.name}")
        try:
            with progress(False if opts.quiet else None) as bar:
                res = sy.sync_pair(pair, opts, bar=bar)
        except TrackbridgeError as e:
            # one pair's lock, bad configuration or unreachable server must not stop the
            # others, and the report must still say what happened
            _debug_traceback()
            res = sy.PairResult(pair, None, 0.0, error=str(e), exit_code=e.exit_code)
            where = f"pair {pair.name}: " if len(pairs) > 1 else ""
            click.echo(scrub(f"trackbridge: error: {where}{e}"), err=True)
        if res.report is not None:
            _print_sync(res, opts.quiet)
            if opts.verify:
                keys = tuple(
                    r.run_key for r in res.report.runs if r.outcome in ("new", "updated", "unchanged")
                )
                if keys:
                    vsel = replace(pair.selection(), runs=frozenset(keys), projects=())
                    res.verify_code = run_verify(pair.source, pair.destination, vsel)
        results.append(res)
        code = max(code, res.exit_code, res.verify_code or 0)
    if opts.report:
        path = Path(opts.report.replace("{date}", started.strftime("%Y-%m-%d")))
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "started": started.isoformat(),
            "finished": datetime.now(UTC).isoformat(),
            "exit_code": code,
            "pairs": [r.to_json() for r in results],
        }
        path.write_text(scrub(json.dumps(doc, indent=2, default=str)))
    return code


def _print_sync(res: Any, quiet: bool) -> None:
    report = res.report
    if not quiet:
        for line in report.summary_lines():
            click.echo(f"  {line}")
        extra = f"; delta bundle {res.delta}" if res.delta else ""
        click.echo(f"  took {res.seconds:.1f} s, {res.retries} request(s) retried{extra}")
    for r in report.runs:
        if r.outcome == "failed":
            click.echo(scrub(f"trackbridge: run {r.run_key} failed: {r.error}"), err=True)
            if _State.debug and getattr(r, "_traceback", None):
                click.echo(scrub(r._traceback), err=True)  # type: ignore[attr-defined]
    for e in report.errors:
        click.echo(scrub(f"trackbridge: {e}"), err=True)


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
    flag = " --register-models" if sel.register_models else ""
    click.echo(
        f"Keep it up to date every night (only what changed moves): trackbridge sync {src} {dest}{flag}"
    )
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
        _debug_traceback()
        click.echo(f"trackbridge: error: {scrub(e.message)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("trackbridge: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except SystemExit:
        raise
    except Exception as e:
        _debug_traceback()
        click.echo(
            f"trackbridge: error: {type(e).__name__}: {scrub(first_line(e))} (run with --debug for details)",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)


if __name__ == "__main__":  # pragma: no cover
    main()
