"""Several trackbridge processes writing one destination at once: whatever they are (an
import beside a migrate, the shards of one sync, syncs of one pair spelt two ways, two
"machines" that share no lock), the destination ends with every run of every source
exactly once, read back with MLflow's own client, and `verify` says identical."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
from trackbridge import sync as sy
from trackbridge.trackers.mlflow import common as mc

from tests.conftest import hold_sync_lock, run_cli
from tests.factories import small_mlflow_store

pytest.importorskip("wandb")


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The real command in its own process; its output goes to files (pipes read one
    after the other could fill up and stall a writer)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
    p = subprocess.Popen(
        [sys.executable, "-m", "trackbridge.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=err,
    )
    p.files = (out, err)  # type: ignore[attr-defined]
    return p


def finish(procs: list[subprocess.Popen], allowed: tuple[int, ...] = (0,)) -> list[int]:
    codes = []
    for p in procs:
        p.wait(timeout=600)
        out, err = p.files  # type: ignore[attr-defined]
        out.seek(0)
        err.seek(0)
        text_out, text_err = out.read(), err.read()
        assert p.returncode in allowed, (
            f"{p.args[3:]} exit {p.returncode}\n{text_out[-1500:]}\n{text_err[-3000:]}"
        )
        assert "Traceback" not in text_err, text_err
        codes.append(p.returncode)
    return codes


def _live_runs(tracking_uri: str, experiments: list[str] | None = None) -> list:
    """Runs trackbridge wrote, as MLflow's client lists them, without the copies it retired."""
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(tracking_uri)
    exps = [
        e.experiment_id
        for e in client.search_experiments(view_type=ViewType.ALL)
        if experiments is None or e.name in experiments
    ]
    runs = client.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000)
    return [r for r in runs if mc.TAG_SOURCE_KEY in r.data.tags and mc.TAG_DUPLICATE_OF not in r.data.tags]


def _each_once(runs: list, expected: int) -> None:
    keys = [r.data.tags[mc.TAG_SOURCE_KEY] for r in runs]
    assert len(keys) == expected and len(set(keys)) == expected, sorted(keys)
    assert all("fingerprint" in mc.run_state(r.data.tags) for r in runs)  # every import completed


@pytest.fixture(scope="module")
def sources(demo_store, wandb_demo, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("sources")
    bundle = d / "mlflow-bundle"
    run_cli("export", demo_store["tb"], str(bundle))
    return {
        "bundle": str(bundle),  # the MLflow demo: 6 runs and a registry
        "mlflow": demo_store["tb"],
        "wandb": f"wandb+offline://{wandb_demo}",  # 3 runs
        "small": small_mlflow_store(d / "small.db", "small", 0.5),  # 1 run
    }


@pytest.mark.parametrize("trial", range(2))
def test_an_import_and_a_migrate_creating_one_new_store(sources, tmp_path, trial):
    db = tmp_path / "dest.db"
    dest = f"mlflow+sqlite:///{db}"
    finish(
        [
            _start("import", sources["bundle"], dest),
            _start("migrate", sources["wandb"], dest, "--no-verify"),
        ]
    )
    _each_once(_live_runs(f"sqlite:///{db}"), 6 + 3)
    for src in (sources["mlflow"], sources["wandb"]):
        assert "verify: identical" in run_cli("verify", src, dest).stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest-artifacts", "dest.db"]  # nothing half-built


def test_three_writers_creating_one_new_store(sources, tmp_path):
    """An import and the syncs of two pairs that share their destination."""
    db = tmp_path / "dest.db"
    dest = f"mlflow+sqlite:///{db}"
    finish(
        [
            _start("import", sources["bundle"], dest),
            _start("sync", sources["wandb"], dest, "--state-dir", str(tmp_path / "s1")),
            _start("sync", sources["small"], dest, "--state-dir", str(tmp_path / "s1")),
        ]
    )
    _each_once(_live_runs(f"sqlite:///{db}"), 6 + 3 + 1)
    for src in (sources["mlflow"], sources["wandb"], sources["small"]):
        assert "verify: identical" in run_cli("verify", src, dest).stdout


def test_two_shards_into_one_new_store(sources, tmp_path):
    db = tmp_path / "dest.db"
    dest = f"mlflow+sqlite:///{db}"
    state = str(tmp_path / "state")
    finish(
        [_start("sync", sources["mlflow"], dest, "--shard", f"{k}/2", "--state-dir", state) for k in (1, 2)]
    )
    _each_once(_live_runs(f"sqlite:///{db}"), 6)
    assert "verify: identical" in run_cli("verify", sources["mlflow"], dest).stdout


def test_a_sync_of_the_same_pair_spelt_otherwise_waits_its_turn(wandb_demo, tmp_path):
    """`/x` and `/x/`, two state folders: still one pair, so the second is refused (75)."""
    first = (f"wandb+offline://{wandb_demo}", f"mlflow+sqlite:///{tmp_path / 'dest.db'}")
    second = (f"wandb+offline://{wandb_demo}/", f"mlflow+sqlite:///{tmp_path}/./dest.db")
    holder = hold_sync_lock(tmp_path / "state-a", *first)
    try:
        p = run_cli("sync", *second, "--state-dir", str(tmp_path / "state-b"), check=75)
        assert f"another sync of this pair is running (pid {holder.pid} on" in p.stderr
        # a shard of the pair waits for it too
        run_cli("sync", *second, "--state-dir", str(tmp_path / "state-c"), "--shard", "1/2", check=75)
    finally:
        holder.kill()
        holder.wait()
    assert sy.Pair(*first).identity == sy.Pair(*second).identity
    both = [
        _start("sync", *pair, "--state-dir", str(tmp_path / f"st{i}"))
        for i, pair in enumerate((first, second))
    ]
    codes = finish(both, allowed=(0, 75))
    assert 0 in codes
    _each_once(_live_runs(f"sqlite:///{tmp_path / 'dest.db'}"), 3)
    assert "verify: identical" in run_cli("verify", *first).stdout


@pytest.mark.parametrize("trial", range(3))
def test_two_machines_syncing_one_server_never_both_create_a_run(sources, mlflow_server, tmp_path, trial):
    """No lock is shared (each "machine" has its own lock and state folders), so the
    server itself is the last line of defence: each importer looks for the run by its
    source key right before creating it, and gives way to an earlier claim right after."""
    dest = f"mlflow+{mlflow_server}"
    name = f"race{trial}-{time.time_ns()}"
    for i in range(2):
        (tmp_path / f"machine{i}").mkdir(mode=0o700)
    procs = [
        _start(
            "sync",
            sources["mlflow"],
            dest,
            "--experiment-name",
            f"{name}-{{project}}",
            "--no-registry",
            "--workers",
            "2",
            "--state-dir",
            str(tmp_path / f"state{i}"),
            env={"XDG_RUNTIME_DIR": str(tmp_path / f"machine{i}")},
        )
        for i in range(2)
    ]
    finish(procs)
    runs = _live_runs(mlflow_server, None)
    runs = [r for r in runs if r.info.experiment_id in _experiments_named(mlflow_server, name)]
    active = [r for r in runs if r.info.lifecycle_stage == "active"]
    _each_once(runs, 6)
    assert len(active) == 5  # the demo's deleted run stays deleted


def _experiments_named(tracking_uri: str, prefix: str) -> set[str]:
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(tracking_uri)
    return {
        e.experiment_id
        for e in client.search_experiments(view_type=ViewType.ALL)
        if e.name.startswith(prefix)
    }


def test_two_writers_into_one_wandb_offline_folder(sources, tmp_path):
    dest = f"wandb+offline://{tmp_path / 'out'}"
    finish([_start("migrate", sources["mlflow"], dest, "--no-verify") for _ in range(2)])
    folders = sorted((tmp_path / "out" / "wandb").glob("offline-run-*"))
    ids = [f.name.rsplit("-", 1)[1] for f in folders]
    assert len(ids) == 6 and len(set(ids)) == 6, ids
    # offline W&B runs hold no registry, and an experiment with no runs makes no project
    only = ("--experiment", "demo-classifier", "--experiment", "demo-regression", "--no-registry")
    assert "verify: identical" in run_cli("verify", sources["mlflow"], dest, *only).stdout


def test_a_param_another_importer_wrote_a_moment_before_is_no_failure(sources, tmp_path, monkeypatch):
    """What MLflow answers when two importers insert one param into one run at the same
    moment (seen in the race above, not every time): the import reads the run afresh and
    writes only what it lacks, instead of failing the run. (Through MLflow's API, as
    into a server: the bulk path commits a run whole, under the store's lock.)"""
    monkeypatch.setenv("TRACKBRIDGE_BULK", "0")
    from mlflow.exceptions import MlflowException
    from trackbridge import engine
    from trackbridge.model import Selection
    from trackbridge.uri import open_sink, open_source

    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    sink = open_sink(dest)
    client = sink.client.unwrapped
    real = client.log_batch
    raced = []

    def log_batch(run_id, metrics=(), params=(), tags=(), **kw):
        if params and not raced:
            raced.append(run_id)
            real(run_id, params=params, synchronous=True)  # the other importer, just before
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: params.key, params.run_uuid"
            )
        return real(run_id, metrics=metrics, params=params, tags=tags, **kw)

    client.log_batch = log_batch
    report = engine.copy(open_source(sources["bundle"]), sink, Selection())
    assert raced and not report.failed, [r.error for r in report.runs]
    _each_once(_live_runs(f"sqlite:///{tmp_path / 'dest.db'}"), 6)
    assert "verify: identical" in run_cli("verify", sources["mlflow"], dest).stdout


def test_a_copy_another_importer_retired_while_we_wrote_it_is_no_failure(sources, tmp_path, monkeypatch):
    """The other order of the server race above (seen in CI): importer B creates its copy,
    looks and sees only its own, and starts writing; importer A, whose claim is earlier,
    creates its copy a moment later, sees both and retires B's. B's next write meets a
    deleted run (MLflow: "must be in the 'active' state"): it must carry on into A's
    copy, not fail the run. (Through MLflow's API, as into a server.)"""
    monkeypatch.setenv("TRACKBRIDGE_BULK", "0")
    from trackbridge import claims, engine
    from trackbridge.model import Selection
    from trackbridge.uri import open_sink, open_source

    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    sink = open_sink(dest)
    client = sink.client.unwrapped
    real = client.log_batch
    earlier = claims.new_claim()  # A's claim, taken before B's
    raced: list[str] = []

    def log_batch(run_id, metrics=(), params=(), tags=(), **kw):
        if params and not raced:
            raced.append(run_id)
            ours = client.get_run(run_id)
            theirs = client.create_run(  # as A makes it: the same fields but its claim
                ours.info.experiment_id,
                start_time=ours.info.start_time,
                run_name=ours.info.run_name,
                tags={
                    **{k: v for k, v in ours.data.tags.items() if not k.startswith("mlflow.runName")},
                    mc.TAG_STATE: mc.state_text({"claim": earlier}),
                },
            )
            client.set_tag(run_id, mc.TAG_DUPLICATE_OF, theirs.info.run_id)
            client.delete_run(run_id)
        return real(run_id, metrics=metrics, params=params, tags=tags, **kw)

    client.log_batch = log_batch
    report = engine.copy(open_source(sources["bundle"]), sink, Selection())
    assert raced and not report.failed, [r.error for r in report.runs]
    runs = _live_runs(f"sqlite:///{tmp_path / 'dest.db'}")
    _each_once(runs, 6)
    assert raced[0] not in {r.info.run_id for r in runs}
    assert "verify: identical" in run_cli("verify", sources["mlflow"], dest).stdout
