"""MLflow's production stores, PostgreSQL and MySQL (MariaDB), real in tests: used
in-process and behind a real `mlflow server`, read back with MLflow's own client and
SQL. The servers come from Debian's packages (``.ci/run`` installs them) and are
started once per test session by ``conftest.postgres`` / ``conftest.mariadb``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from trackbridge.trackers.mlflow import common as mc

from tests.conftest import killable_env, one_line, run_cli


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command, run from ``cwd`` (where MLflow would drop ./mlruns)."""
    return subprocess.run(
        [sys.executable, "-m", "trackbridge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def ours(url: str) -> list:
    client = mlflow.MlflowClient(url)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000)
    return [r for r in runs if mc.TAG_SOURCE_KEY in r.data.tags]


def test_a_migration_into_a_database_store_lands_whole_and_its_files_where_told(
    demo_store, database, tmp_path
):
    """The demo store into PostgreSQL / MariaDB in-process: verified identical, each run
    once as MLflow's client lists it, every file under --artifact-root (the runs' and the
    model versions' sources), nothing in the folder the command ran in; again: nothing."""
    dest = f"mlflow+{database}"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    root = tmp_path / "artifacts"
    p = cli("migrate", demo_store["tb"], dest, "--artifact-root", str(root), cwd=cwd)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verify: identical" in p.stdout
    runs = ours(database)
    keys = [r.data.tags[mc.TAG_SOURCE_KEY] for r in runs]
    assert len(keys) == 6 and len(set(keys)) == 6
    assert all(r.info.artifact_uri.startswith(root.as_uri()) for r in runs)
    client = mlflow.MlflowClient(database)
    versions = client.search_model_versions()
    assert versions and all(v.source.startswith(("models:/", root.as_uri())) for v in versions)
    assert any(f.is_file() for f in root.rglob("*"))
    assert list(cwd.iterdir()) == []  # no ./mlruns by accident
    again = cli("migrate", demo_store["tb"], dest, "--artifact-root", str(root), cwd=cwd)
    assert again.returncode == 0 and "6 unchanged" in again.stdout, again.stdout + again.stderr
    assert len(ours(database)) == 6


def test_a_new_experiment_with_nowhere_for_its_files_is_refused_before_the_export(
    demo_store, postgres, tmp_path
):
    dest = "mlflow+" + postgres.create_database("noroot")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    t0 = time.monotonic()
    p = cli("migrate", demo_store["tb"], dest, cwd=cwd)
    assert p.returncode == 2, p.stdout + p.stderr
    line = one_line(p.stderr)
    assert "--artifact-root" in line and "needs a place for its files" in line
    assert "runs:" not in p.stdout  # refused before anything was exported or written
    assert time.monotonic() - t0 < 30
    assert ours(dest.removeprefix("mlflow+")) == [] and list(cwd.iterdir()) == []
    # an experiment made beforehand with its own location needs no --artifact-root
    client = mlflow.MlflowClient(dest.removeprefix("mlflow+"))
    for name in ("Default", "demo-classifier", "demo-regression"):
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(tmp_path / "own" / name).as_uri())
    p = cli("migrate", demo_store["tb"], dest, "--no-registry", cwd=cwd)
    assert p.returncode == 0, p.stdout + p.stderr
    assert all(r.info.artifact_uri.startswith((tmp_path / "own").as_uri()) for r in ours(dest[7:]))


def test_artifact_root_is_refused_where_it_means_nothing(wandb_demo, tmp_path):
    src, dest = f"wandb+offline://{wandb_demo}", f"wandb+offline://{tmp_path / 'out'}"
    p = run_cli("migrate", src, dest, "--artifact-root", str(tmp_path), check=2)
    assert one_line(p.stderr).endswith("--artifact-root: Weights & Biases destinations do not take it")


@pytest.mark.parametrize(
    ("scheme", "hidden", "names"),
    [
        ("postgresql", "psycopg", ("'psycopg[binary]'", "trackbridge[postgres]")),
        ("postgresql+psycopg2", "psycopg2", ("'psycopg2-binary'", "trackbridge[postgres]")),
        ("mysql+pymysql", "pymysql", ("'pymysql'", "trackbridge[mysql]")),
        ("mysql", None, ("'mysqlclient'", "mlflow+mysql+pymysql://")),
    ],
)
def test_a_missing_database_driver_is_one_line_naming_the_package(
    demo_store, tmp_path, scheme, hidden, names
):
    """Before any export: within seconds, exit 2, the pip package (and the extra) named."""
    env = {}
    if hidden:  # the driver as if never installed: a module of its name that cannot import
        shadow = tmp_path / "shadow" / hidden
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(
            f'raise ImportError("No module named {hidden!r}", name={hidden!r})\n'
        )
        env["PYTHONPATH"] = str(tmp_path / "shadow")
    t0 = time.monotonic()
    p = cli("migrate", demo_store["tb"], f"mlflow+{scheme}://u:secret@127.0.0.1:9/x", cwd=tmp_path, env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    line = one_line(p.stderr)
    assert all(n in line for n in names), line
    assert "secret" not in line and "runs:" not in p.stdout
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg2", "mysql+pymysql"])
def test_a_database_that_cannot_be_reached_is_one_line(demo_store, tmp_path, scheme):
    """Nothing listens on port 9: as a destination exit 5, as a source exit 3, each one
    line naming the store (its password left out), before anything is exported."""
    url = f"mlflow+{scheme}://u:secret@127.0.0.1:9/x"
    p = run_cli("migrate", demo_store["tb"], url, check=5)
    line = one_line(p.stderr)
    assert "cannot write" in line and "secret" not in line and "runs:" not in p.stdout
    p = run_cli("migrate", url, f"mlflow+sqlite:///{tmp_path / 'd.db'}", check=3)
    line = one_line(p.stderr)
    assert "cannot connect" in line and "secret" not in line


def test_a_server_on_a_database_takes_a_migration_and_a_resync(demo_store, database, tmp_path):
    """A real `mlflow server --workers 2` with PostgreSQL / MariaDB behind it, written by
    several trackbridge workers at once; MLflow's client lists each run once, and so does
    the database itself."""
    import sqlalchemy as sa
    from trackbridge.trackers.mlflow.server import LocalMlflowServer

    with LocalMlflowServer(tmp_path / "server", workers=2, backend=database) as url:
        dest = f"mlflow+{url}"
        p = run_cli("migrate", demo_store["tb"], dest, "--workers", "4")
        assert "verify: identical" in p.stdout
        runs = ours(url)
        assert len({r.data.tags[mc.TAG_SOURCE_KEY] for r in runs}) == len(runs) == 6
        for _ in range(2):  # the first sync after a migrate notes each run's change token
            again = run_cli("sync", demo_store["tb"], dest, "--state-dir", str(tmp_path / "state"))
            assert "metric points written: 0; artifact files written: 0" in again.stdout
        assert "6 unchanged" in again.stdout, again.stdout
    tags = sa.table("tags", sa.column("key"), sa.column("value"))
    engine = sa.create_engine(database)
    try:
        with engine.connect() as c:
            rows = c.execute(
                sa.select(sa.func.count(), sa.func.count(sa.distinct(tags.c.value))).where(
                    tags.c.key == mc.TAG_SOURCE_KEY
                )
            ).one()
    finally:
        engine.dispose()
    assert tuple(rows) == (6, 6)


def test_a_nightly_sync_of_wandb_runs_into_mysql_keeps_its_files_under_the_root(
    wandb_demo, mariadb, tmp_path
):
    """The sync's own path (no bundle) into MariaDB, the root given in the config file."""
    db = mariadb.create_database("nightly")
    root = tmp_path / "store"
    config = tmp_path / "sync.toml"
    config.write_text(
        f'[[pair]]\nname = "n"\nsource = "wandb+offline://{wandb_demo}"\n'
        f'destination = "mlflow+{db}"\nartifact_root = "{root}"\n'
    )
    state = ["--state-dir", str(tmp_path / "state")]
    p = run_cli("sync", "--config", str(config), "--verify", *state)
    assert "0 failed" in p.stdout and "verify: identical" in p.stdout, p.stdout
    runs = ours(db)
    assert runs and all(r.info.artifact_uri.startswith(root.as_uri()) for r in runs)
    p = run_cli("sync", "--config", str(config), "--artifact-root", str(root), *state, check=2)
    assert "artifact_root in its [[pair]]" in one_line(p.stderr)


PG_KILL_TRIALS = 6


def test_kill_9_at_random_moments_into_postgresql_then_sync_leaves_one_clean_copy(
    wandb_demo, postgres, tmp_path
):
    """As the SQLite trials (test_sync): syncs into PostgreSQL killed with SIGKILL at
    random moments, each followed by one more sync and `verify`: every run once, every
    point once, one model version. The bulk path's groups and the API path's model run
    are both in each sync."""
    import random

    rng = random.Random(20261201)
    src = f"wandb+offline://{wandb_demo}"
    root = str(tmp_path / "files")

    def start(dest: str, state: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "trackbridge.cli", "sync", src, dest, "--register-models",
               "--artifact-root", root, "--state-dir", state]  # fmt: skip
        return subprocess.Popen(
            cmd, env=killable_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    t0 = time.perf_counter()
    assert start(f"mlflow+{postgres.create_database('clean')}", str(tmp_path / "s-clean")).wait() == 0
    clean = time.perf_counter() - t0
    killed = 0
    for trial in range(PG_KILL_TRIALS):
        url = postgres.create_database(f"kill{trial}")
        dest, state = f"mlflow+{url}", str(tmp_path / f"s{trial}")
        proc = start(dest, state)
        time.sleep(rng.uniform(0.3, 0.95) * clean)
        if proc.poll() is None:
            proc.kill()
            killed += 1
        proc.wait()
        assert start(dest, state).wait() == 0
        p = run_cli("verify", src, dest, "--register-models", check=None)
        assert p.returncode == 0, f"trial {trial}: {p.stdout[-2000:]}"
        live = [
            r
            for r in ours(url)
            if r.info.lifecycle_stage == "active" and mc.TAG_DUPLICATE_OF not in r.data.tags
        ]
        assert len(live) == 3 and len({r.data.tags[mc.TAG_SOURCE_KEY] for r in live}) == 3
        assert len(mlflow.MlflowClient(url).search_model_versions("name='demo-classifier'")) == 1
    assert killed >= PG_KILL_TRIALS // 2, (killed, clean)


def test_two_importers_into_one_postgresql_store_keep_each_run_once(demo_store, postgres, tmp_path):
    """Two migrations of one source into one PostgreSQL store at once, as from two
    machines: the database's own advisory lock orders their group commits, and whichever
    commits a run second finds it taken and writes into it. No copy is ever made, so none
    needs retiring."""
    url = postgres.create_database("race")
    dest = f"mlflow+{url}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trackbridge.cli",
                "migrate",
                demo_store["tb"],
                dest,
                "--no-verify",
                "--artifact-root",
                str(tmp_path / "files"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, out + err
    runs = ours(url)  # deleted ones included
    assert not [r for r in runs if mc.TAG_DUPLICATE_OF in r.data.tags]
    assert len(runs) == 6 and len({r.data.tags[mc.TAG_SOURCE_KEY] for r in runs}) == 6
    assert "verify: identical" in run_cli("verify", demo_store["tb"], dest).stdout


def test_keys_that_differ_only_in_case_both_land_in_mysql_and_come_back_exact(mariadb, tmp_path):
    """MySQL's tables compare keys without regard to case or accents, so ``LR`` and
    ``lr`` are one primary key there: the second is renamed as any colliding key is,
    the original kept in mapping.json, and `verify` reads both back exact."""
    from tests import factories as f

    bundle = f.write_bundle(
        tmp_path / "bundle",
        [f.project()],
        [
            f.payload(
                f.run("test:run/cased"),
                params=[(["LR"], 0.1), (["lr"], 0.2), (["café"], 1), (["cafe"], 2)],
                tags={"Team": "a", "team": "b"},
                points=[("Loss", 0, 1.0), ("loss", 0, 1.0), ("loss", 1, 0.5)],
            )
        ],
    )
    url = mariadb.create_database("cased")
    p = run_cli("migrate", str(bundle), f"mlflow+{url}", "--artifact-root", str(tmp_path / "files"))
    assert "verify: identical" in p.stdout and "0 failed" in p.stdout, p.stdout
    (run,) = ours(url)
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert len(params) == 4 and {"LR", "café"} <= set(params)
    assert sorted(params.values()) == ["0.1", "0.2", "1", "2"]
    assert {"Team", "team"} & set(tags) and sum(k.lower().startswith("team") for k in tags) == 2
    assert len(metrics) == 2 and "Loss" in metrics
    renamed = next(k for k in metrics if k != "Loss")
    history = mlflow.MlflowClient(url).get_metric_history(run.info.run_id, renamed)
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
