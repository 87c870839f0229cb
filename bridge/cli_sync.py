"""``trackbridge sync``: the nightly job's command, from the command line or a
``sync.toml`` of several pairs, each pair's failure reported without stopping the
others.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from trackbridge.cli_common import (
    EPILOG_URIS,
    DebugState,
    artifact_root_option,
    debug_traceback,
    report_option,
    run_verify,
    selection_of,
    selection_options,
    workers_option,
)
from trackbridge.errors import ExitCode, TrackbridgeError, UsageError
from trackbridge.progress import progress
from trackbridge.report import scrub

SYNC_HELP = """Copy what is new or changed in SRC into DEST; made to run every night.

\b
  trackbridge sync wandb://acme/research mlflow+https://mlflow.acme.internal --register-models
  trackbridge sync --config /etc/trackbridge/sync.toml
  trackbridge sync SRC DEST --shard 3/8          (one of 8 machines or tasks)
  trackbridge sync SRC DEST --shard auto         (in a Kubernetes Indexed Job or a Slurm array)

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


@click.command("sync", help=SYNC_HELP, epilog=EPILOG_URIS)
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
@artifact_root_option
@click.option(
    "--shard",
    metavar="K/N|auto",
    help="Copy only shard K of N (a stable hash of each run family); auto: K and N from the "
    "scheduler (TRACKBRIDGE_SHARD, a Kubernetes Indexed Job, a Slurm array; docs/scale-out.md).",
)
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
    from trackbridge import retry
    from trackbridge import sync as sy

    pairs, settings, retry_cfg = _pairs(src, dest, config_path, kw)
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
            debug_traceback()
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


def _pairs(
    src: str | None, dest: str | None, config_path: str | None, kw: dict[str, Any]
) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """The pairs to sync, with the config file's [sync] and [retry] settings: from
    --config, or the one pair SRC DEST with the command line's filters."""
    from trackbridge import sync as sy

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
        if ignored or kw.get("updated_since") or kw.get("experiment_name") or kw.get("artifact_root"):
            raise UsageError(
                "with --config, put filters in the config file's [pair.filter], and experiment "
                "and artifact_root in its [[pair]]"
            )
    else:
        if not (src and dest):
            raise UsageError("sync needs SRC and DEST, or --config FILE (see trackbridge sync --help)")
        sel = selection_of(kw)
        if kw.get("experiment_name"):
            sy.check_template(kw["experiment_name"], "--experiment-name")
        pairs = [
            sy.Pair(
                source=src,
                destination=dest,
                experiment=kw.get("experiment_name"),
                artifact_root=kw.get("artifact_root"),
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
    return pairs, settings, retry_cfg


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
            if DebugState.debug and getattr(r, "_traceback", None):
                click.echo(scrub(r._traceback), err=True)  # type: ignore[attr-defined]
    for e in report.errors:
        click.echo(scrub(f"trackbridge: {e}"), err=True)
