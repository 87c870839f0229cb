"""`trackbridge sync`: incremental, idempotent, locked, filtered, sharded, audited.

The source is the W&B demo written by the real SDK in offline mode; the destination a
real MLflow SQLite store (and a real `mlflow server` behind a fault-injecting proxy).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pytest
from trackbridge import sync as sy
from trackbridge.model import ModelRule, Selection
from trackbridge.trackers.mlflow import common as mc

from tests.conftest import hold_sync_lock, killable_env, run_cli

pytest.importorskip("wandb")


def _src(wandb_demo: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(wandb_demo, src, symlinks=True)
    return src


def _opts(tmp_path: Path, **kw: object) -> sy.Options:
    return sy.Options(state_dir=tmp_path / "state", **kw)  # type: ignore[arg-type]


def _runs(db: Path) -> list:
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return [
        r for r in client.search_runs(exps, run_view_type=ViewType.ALL) if mc.TAG_SOURCE_KEY in r.data.tags
    ]


def _verify(src: str, dest: str, sel: Selection | None = None) -> list[str]:
    from trackbridge.uri import open_source
    from trackbridge.verify import verify

    diffs, _ = verify(open_source(src), open_source(dest), sel or Selection(register_models=True))
    return diffs


def test_second_sync_reads_nothing_and_a_lost_state_folder_duplicates_nothing(
    wandb_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trackbridge.exporters.wandb.offline import WandbOfflineSource

    src = f"wandb+offline://{_src(wandb_demo, tmp_path)}"
    db = tmp_path / "dest.db"
    pair = sy.Pair(src, f"mlflow+sqlite:///{db}", register_models=True)
    first = sy.sync_pair(pair, _opts(tmp_path))
    assert [r.outcome for r in first.report.runs] == ["new"] * 3
    assert first.report.models == {"new": 1, "unchanged": 0}

    reads = []
    real = WandbOfflineSource.read_run
    monkeypatch.setattr(
        WandbOfflineSource, "read_run", lambda self, row: reads.append(row) or real(self, row)
    )
    before = {r.info.run_id: repr((r.data.tags, sorted(r.data.metrics.items()))) for r in _runs(db)}
    second = sy.sync_pair(pair, _opts(tmp_path))
    assert [r.outcome for r in second.report.runs] == ["unchanged"] * 3
    assert reads == []  # skipped on the destination's change tokens, unread
    assert second.report.points == 0 and second.report.models == {"new": 0, "unchanged": 0}
    assert {r.info.run_id: repr((r.data.tags, sorted(r.data.metrics.items()))) for r in _runs(db)} == before

    shutil.rmtree(tmp_path / "state")  # the cache is gone: identity is in the destination
    third = sy.sync_pair(pair, _opts(tmp_path))
    assert [r.outcome for r in third.report.runs] == ["unchanged"] * 3
    assert len(_runs(db)) == 3
    # --full reads every run and still writes nothing
    full = sy.sync_pair(pair, _opts(tmp_path, full=True))
    assert [r.outcome for r in full.report.runs] == ["unchanged"] * 3 and len(reads) == 3
    assert full.report.models == {"new": 0, "unchanged": 1}
    assert _verify(src, f"mlflow+sqlite:///{db}") == []


def test_a_growing_run_gets_only_its_new_points_and_a_new_run_is_added(
    wandb_demo: Path, tmp_path: Path
) -> None:
    """A run still being written (its log cut mid-record, as a live job's is) is synced
    as incomplete; the next sync adds only the points written since, and clears the
    incomplete mark once the run is whole."""
    # the baseline run: the longest history whose run record sits in the first block
    # (the diverged run's 32 KiB config would be cut too)
    full = min(
        (p for p in wandb_demo.rglob("*.wandb") if p.stat().st_size > 20_000), key=lambda p: p.stat().st_size
    )
    run_dir = full.parent
    src = tmp_path / "src"
    (src / "wandb").mkdir(parents=True)
    live = src / "wandb" / run_dir.name
    shutil.copytree(run_dir, live, symlinks=True)
    log = live / full.name
    log.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3 + 11])
    uri = f"wandb+offline://{src}"
    db = tmp_path / "dest.db"
    pair = sy.Pair(uri, f"mlflow+sqlite:///{db}")

    first = sy.sync_pair(pair, _opts(tmp_path))
    (r1,) = first.report.runs
    assert r1.outcome == "new" and r1.points > 0
    (run,) = _runs(db)
    assert run.data.tags[mc.TAG_INCOMPLETE] == "true"

    shutil.copyfile(full, log)  # the job wrote the rest
    second = sy.sync_pair(pair, _opts(tmp_path))
    (r2,) = second.report.runs
    from trackbridge.uri import open_source

    src_reader = open_source(uri)
    (row,) = src_reader.runs(Selection(), src_reader.projects(Selection()))
    # W&B's own _runtime is kept in a run file (trackbridge.native), not counted as points
    total = sum(
        b.filter(pc.not_equal(b.column("key"), "_runtime")).num_rows
        for b in src_reader.read_run(row).metrics()
    )
    assert r2.outcome == "updated" and r2.points == total - r1.points, (r1.points, r2.points, total)
    (run,) = _runs(db)
    assert mc.TAG_INCOMPLETE not in run.data.tags
    assert _verify(uri, f"mlflow+sqlite:///{db}", Selection()) == []

    # a new run appears: only it is written
    other = next(p.parent for p in wandb_demo.rglob("*.wandb") if p.parent != run_dir)
    shutil.copytree(other, src / "wandb" / other.name, symlinks=True)
    third = sy.sync_pair(pair, _opts(tmp_path))
    assert sorted(r.outcome for r in third.report.runs) == ["new", "unchanged"]
    assert len(_runs(db)) == 2


def test_a_running_sync_holds_the_lock_and_a_killed_one_does_not(wandb_demo: Path, tmp_path: Path) -> None:
    src = f"wandb+offline://{wandb_demo}"
    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    state = tmp_path / "state"
    holder = hold_sync_lock(state, src, dest)
    try:
        p = run_cli("sync", src, dest, "--state-dir", str(state), check=75)
        assert f"another sync of this pair is running (pid {holder.pid} on" in p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (state / sy.Pair(src, dest).pair_id / "lock").exists()
    p = run_cli("sync", src, dest, "--state-dir", str(state))
    assert "runs: 3 new" in p.stdout


CONFIG = """
# comments are allowed, as in the documented example
[sync]
workers = 1

[retry]
attempts = 4
initial_wait = 0.1
max_wait = 5

[[pair]]
name = "finished-research"
source = "wandb+offline://{src}"
destination = "mlflow+sqlite:///{db}"
experiment = "wandb/{{project}}"

[pair.filter]
states = ["finished"]
exclude_tags = ["no-such-tag"]

[pair.registry]
[[pair.registry.rule]]
artifact = "demo-*"
type = "model"
model = "prod-{{artifact}}"
aliases = ["production"]
"""


def test_config_file_filters_names_and_registers(wandb_demo: Path, tmp_path: Path) -> None:
    import mlflow

    db = tmp_path / "dest.db"
    cfg = tmp_path / "sync.toml"
    cfg.write_text(CONFIG.format(src=wandb_demo, db=db))
    report = tmp_path / "reports" / "sync-{date}.json"
    p = run_cli("sync", "--config", str(cfg), "--state-dir", str(tmp_path / "state"), "--report", str(report))
    assert "runs: 2 new, 0 updated, 0 unchanged, 0 failed, 1 filtered out" in p.stdout, p.stdout
    client = mlflow.MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    assert client.get_experiment_by_name("wandb/demo-research") is not None
    assert "diverged" not in {r.info.run_name for r in _runs(db)} and len(_runs(db)) == 2
    assert all(r.data.tags.get(mc.TAG_SOURCE_STATUS) is None for r in _runs(db))
    model = client.get_registered_model("prod-demo-classifier")
    assert {k: str(v) for k, v in model.aliases.items()} == {"production": "1"}  # no "candidate"

    doc = json.loads(next((tmp_path / "reports").glob("sync-*.json")).read_text())
    (pair,) = doc["pairs"]
    assert doc["exit_code"] == 0 and pair["summary"]["filtered"] == 1
    filtered = [r for r in pair["runs"] if r["outcome"] == "filtered"]
    assert filtered[0]["reason"].startswith("state failed not in finished")

    # the experiment was renamed, yet verify finds it by the source key it carries
    p = run_cli("verify", f"wandb+offline://{wandb_demo}", f"mlflow+sqlite:///{db}", "--run", "resumed01")
    assert "verify: identical" in p.stdout

    # a typo is an error, not a silently ignored filter
    cfg.write_text(cfg.read_text().replace("exclude_tags", "exclude_tagz"))
    p = run_cli("sync", "--config", str(cfg), check=2)
    assert "unknown key 'exclude_tagz'" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_shards_split_the_runs_without_overlap(wandb_demo: Path, tmp_path: Path) -> None:
    src = f"wandb+offline://{wandb_demo}"
    db = tmp_path / "dest.db"
    pair = sy.Pair(src, f"mlflow+sqlite:///{db}")
    got = []
    for k in (1, 2, 3):
        res = sy.sync_pair(pair, _opts(tmp_path, shard=(k, 3)))
        got.append({r.run_key for r in res.report.runs})
    assert sum(len(g) for g in got) == 3 and len(set().union(*got)) == 3
    assert len(_runs(db)) == 3
    assert sy.shard_of("wandb:run/p/abc", 8) == sy.shard_of("wandb:run/p/abc", 8)  # stable
    with pytest.raises(Exception, match="expected K/N"):
        sy.parse_shard("0/3")


def test_delta_bundles_replay_and_expire(wandb_demo: Path, tmp_path: Path) -> None:
    src = f"wandb+offline://{wandb_demo}"
    pair = sy.Pair(src, f"mlflow+sqlite:///{tmp_path / 'dest.db'}")
    res = sy.sync_pair(pair, _opts(tmp_path, deltas=True, delta_dir=tmp_path / "deltas"))
    assert res.delta is not None
    again = sy.sync_pair(pair, _opts(tmp_path, deltas=True, delta_dir=tmp_path / "deltas"))
    assert again.delta is None  # nothing moved, no empty bundle
    # the audit trail replays into a fresh store and holds exactly what moved
    replay = f"mlflow+sqlite:///{tmp_path / 'replay.db'}"
    run_cli("import", res.delta, replay)
    assert _verify(src, replay, Selection()) == []

    folder = Path(res.delta).parent
    old = folder / (datetime.now(UTC) - timedelta(days=40)).strftime("%Y%m%dT%H%M%SZ")
    old.mkdir()
    assert sy.prune_deltas(folder, 30) == [old] and Path(res.delta).exists()


def test_unreachable_destination_fails_in_one_line_without_credentials(
    wandb_demo: Path, tmp_path: Path
) -> None:
    p = run_cli(
        "sync",
        f"wandb+offline://{wandb_demo}",
        "mlflow+http://alice:hunter2@127.0.0.1:9",
        "--state-dir",
        str(tmp_path / "state"),
        "--retries",
        "2",
        "--retry-max-wait",
        "0.1",
        "--report",
        str(tmp_path / "r.json"),
        check=None,
    )
    assert p.returncode == 5, p.stderr
    assert "hunter2" not in p.stdout + p.stderr
    assert "Traceback" not in p.stderr and p.stderr.startswith(
        "trackbridge: error: mlflow+http://127.0.0.1:9"
    )
    doc = json.loads((tmp_path / "r.json").read_text())  # monitoring still gets a report
    assert doc["exit_code"] == 5 and "cannot write" in doc["pairs"][0]["error"]
    assert "hunter2" not in json.dumps(doc)


def test_a_permanent_error_on_one_run_leaves_the_others_and_exits_partial(
    wandb_demo: Path, tmp_path: Path
) -> None:
    src = _src(wandb_demo, tmp_path)
    log = next(p for p in src.rglob("*.wandb") if "resumed01" not in str(p) and p.stat().st_size > 20_000)
    from trackbridge.trackers.wandb.leveldb import RecordLog

    # a byte flipped inside a whole record's data in the middle of the file: a bad CRC
    data = bytearray(log.read_bytes())
    offset, payload = min(
        (
            (o, p)
            for o, p in RecordLog(log).payloads()
            if len(p) > 16 and o % 32768 + 7 + len(p) <= 32768 and o + 7 + len(p) < len(data) - 100
        ),
        key=lambda r: abs(r[0] - len(data) // 2),
    )
    data[offset + 7 + len(payload) // 2] ^= 0xFF
    log.write_bytes(bytes(data))
    r = tmp_path / "r.json"
    p = run_cli(
        "sync",
        f"wandb+offline://{src}",
        f"mlflow+sqlite:///{tmp_path / 'dest.db'}",
        "--state-dir",
        str(tmp_path / "state"),
        "--report",
        str(r),
        check=1,
    )
    assert "runs: 2 new, 0 updated, 0 unchanged, 1 failed" in p.stdout
    assert "record checksum mismatch" in p.stderr
    pair = json.loads(r.read_text())["pairs"][0]
    assert pair["exit_code"] == 1 and pair["summary"]["failed"] == 1


KILL_TRIALS = 20


def test_kill_9_at_random_moments_then_sync_leaves_one_clean_copy(wandb_demo: Path, tmp_path: Path) -> None:
    """20 syncs killed with SIGKILL at random moments; after each, one more sync and
    `trackbridge verify`: every run once, every point once, one model version."""
    import random

    rng = random.Random(20261122)
    src = f"wandb+offline://{wandb_demo}"
    env = killable_env(tmp_path, {**os.environ, "TRACKBRIDGE_STATE_DIR": str(tmp_path / "state")})

    def start(dest: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "trackbridge.cli", "sync", src, dest, "--register-models"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # how long one clean sync takes on this machine, so the kills land inside one
    t0 = time.perf_counter()
    assert start(f"mlflow+sqlite:///{tmp_path / 'clean.db'}").wait() == 0
    clean = time.perf_counter() - t0
    killed_mid_way = 0
    for trial in range(KILL_TRIALS):
        db = tmp_path / f"dest{trial}.db"
        dest = f"mlflow+sqlite:///{db}"
        proc = start(dest)
        time.sleep(rng.uniform(0.05, 0.98) * clean)
        if proc.poll() is None:
            proc.kill()
            killed_mid_way += 1
        proc.wait()
        res = sy.sync_pair(sy.Pair(src, dest, register_models=True), sy.Options(state_dir=tmp_path / "state"))
        assert res.exit_code == 0, [r.error for r in res.report.runs]
        p = run_cli("verify", src, dest, "--register-models", check=None)
        assert p.returncode == 0, f"trial {trial}: {p.stdout[-2000:]}"
        runs = _runs(db)
        assert len(runs) == 3 and len({r.data.tags[mc.TAG_SOURCE_KEY] for r in runs}) == 3
        import mlflow

        client = mlflow.MlflowClient(dest.removeprefix("mlflow+"), registry_uri=dest.removeprefix("mlflow+"))
        assert len(client.search_model_versions("name='demo-classifier'")) == 1
    assert killed_mid_way >= KILL_TRIALS * 3 // 4, (killed_mid_way, clean)  # they hit a working sync


def test_sync_through_a_proxy_failing_10_percent_of_requests(
    wandb_demo: Path, tmp_path: Path, mlflow_server: str
) -> None:
    from trackbridge import retry

    from tests.faultproxy import FAULTS, FaultProxy

    src = f"wandb+offline://{wandb_demo}"
    before = (retry.POLICY.attempts, retry.POLICY.initial, retry.POLICY.maximum)
    retry.configure(attempts=12, initial=0.05, maximum=2.0)
    obeyed = retry.POLICY.obeyed
    try:
        with FaultProxy(mlflow_server, rate=0.10, seed=5) as proxy:
            dest = f"mlflow+{proxy.url}"
            # a model name of its own: the shared server holds the MLflow demo's models
            rules = (ModelRule(model="faults-{artifact}"),)
            pair = sy.Pair(src, dest, rules=rules, experiment="faults/{project}")
            res = sy.sync_pair(pair, _opts(tmp_path, workers=2))
            assert res.exit_code == 0, [(r.run_key, r.error) for r in res.report.runs] + res.report.errors
            again = sy.sync_pair(pair, _opts(tmp_path, workers=2))
            assert [r.outcome for r in again.report.runs] == ["unchanged"] * 3
    finally:
        retry.configure(*before)
    assert proxy.counts["requests"] > 50
    for fault in ("429", "503", "drop-before", "drop-after"):
        assert proxy.counts[fault] > 0, proxy.counts
    # every injected fault was retried, and every 429's Retry-After decided its wait,
    # whichever MLflow call (search, create, tag, metric batch, file upload) it hit
    assert res.retries + again.retries >= sum(proxy.counts[f] for f in FAULTS)
    assert retry.POLICY.obeyed - obeyed >= proxy.counts["429"]
    direct = f"mlflow+{mlflow_server}"
    assert _verify(src, direct, Selection(model_rules=rules)) == []
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("faults/demo-research")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    assert len(runs) == 3  # no retried create made a second copy
    versions = [v for v in client.search_model_versions("name='faults-demo-classifier'")]
    assert len({v.tags[mc.TAG_SOURCE_KEY] for v in versions}) == len(versions) == 1


def test_online_registry_links_sync_and_an_alias_moved_in_wandb_moves_in_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B moves an alias without touching the run, so the runs are skipped unread and
    the registry is still asked: the alias moves in MLflow on the next sync."""
    import mlflow
    import trackbridge.exporters.wandb.online as online

    from tests.test_wandb_online import FakeApi

    api = FakeApi()
    monkeypatch.setattr(online, "SdkApi", lambda *a, **k: api)
    db = tmp_path / "dest.db"
    pair = sy.Pair("wandb://acme/vision", f"mlflow+sqlite:///{db}")
    first = sy.sync_pair(pair, _opts(tmp_path))
    assert sorted(r.outcome for r in first.report.runs) == ["new", "new"]
    client = mlflow.MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    aliases = client.get_registered_model("vision-classifier").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"production": "1", "staging": "1"}

    (model,) = api.logged["run001"]
    model.links[0].aliases = ["production"]  # "staging" removed in the W&B Registry
    second = sy.sync_pair(pair, _opts(tmp_path))
    assert [r.outcome for r in second.report.runs] == ["unchanged", "unchanged"]
    assert second.report.models == {"new": 0, "unchanged": 1}
    aliases = client.get_registered_model("vision-classifier").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"production": "1"}


def test_offline_alias_moved_by_a_new_run_moves_on_the_next_sync(wandb_demo: Path, tmp_path: Path) -> None:
    """The next night reads only the new run; its version takes "production" in MLflow,
    while the earlier version, skipped unread, keeps "candidate"."""
    import mlflow
    from trackbridge.trackers.wandb import common as wc

    from tests.test_register_models import NEW_VERSION

    src = tmp_path / "src"
    shutil.copytree(wandb_demo.parent, src, symlinks=True)
    uri = f"wandb+offline://{src / 'wandb'}"
    db = tmp_path / "dest.db"
    pair = sy.Pair(uri, f"mlflow+sqlite:///{db}", register_models=True)
    assert sy.sync_pair(pair, _opts(tmp_path)).report.models == {"new": 1, "unchanged": 0}

    env = {**os.environ, **wc.sandbox_env(src), "HOME": str(src / "home"), "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", NEW_VERSION, str(src)], env=env, check=True, timeout=300)
    res = sy.sync_pair(pair, _opts(tmp_path))
    assert sorted(r.outcome for r in res.report.runs) == ["new", "unchanged", "unchanged", "unchanged"]
    assert res.report.models == {"new": 1, "unchanged": 0}
    client = mlflow.MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    aliases = client.get_registered_model("demo-classifier").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1", "production": "2"}
    assert _verify(uri, f"mlflow+sqlite:///{db}") == []


def test_a_run_left_out_by_a_filter_registers_no_model(wandb_demo: Path, tmp_path: Path) -> None:
    db = tmp_path / "dest.db"
    pair = sy.Pair(
        f"wandb+offline://{wandb_demo}",
        f"mlflow+sqlite:///{db}",
        register_models=True,
        filters=sy.Filters(exclude_tags=("baseline",)),  # the run that logged the model
    )
    for full in (False, False, True):  # the second time from the state, unread; then read again
        res = sy.sync_pair(pair, _opts(tmp_path, full=full))
        (left_out,) = [r for r in res.report.runs if r.outcome == "filtered"]
        assert left_out.reason == "has the excluded tag baseline"
        assert res.report.models == {"new": 0, "unchanged": 0} and res.exit_code == 0
    assert len(_runs(db)) == 2
    # the filter changes: what it left out before is judged again, and comes in
    pair.filters = sy.Filters(exclude_tags=("no-such-tag",))
    res = sy.sync_pair(pair, _opts(tmp_path))
    assert sorted(r.outcome for r in res.report.runs) == ["new", "unchanged", "unchanged"]
    assert res.report.models == {"new": 1, "unchanged": 0} and len(_runs(db)) == 3


def test_a_sync_stopped_before_the_registry_registers_the_models_next_time(
    wandb_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the kill trials: runs complete, registry not reached. Their change
    tokens are written only after the registry step, so the next sync reads them
    again (writing nothing) and registers what is missing."""
    from trackbridge.importers.mlflow.sink import MlflowSink

    src = f"wandb+offline://{wandb_demo}"
    db = tmp_path / "dest.db"
    pair = sy.Pair(src, f"mlflow+sqlite:///{db}", register_models=True)
    real = MlflowSink._write_registry

    def dies(self, payload, report):  # as if the process died here
        raise RuntimeError("killed")

    monkeypatch.setattr(MlflowSink, "_write_registry", dies)
    first = sy.sync_pair(pair, _opts(tmp_path))
    assert [r.outcome for r in first.report.runs] == ["new"] * 3 and first.exit_code == 1
    assert all("token" not in mc.run_state(r.data.tags) for r in _runs(db))

    monkeypatch.setattr(MlflowSink, "_write_registry", real)
    second = sy.sync_pair(pair, _opts(tmp_path))
    assert [r.outcome for r in second.report.runs] == ["unchanged"] * 3 and second.report.points == 0
    assert second.report.models == {"new": 1, "unchanged": 0} and second.exit_code == 0
    assert all("token" in mc.run_state(r.data.tags) for r in _runs(db))
    third = sy.sync_pair(pair, _opts(tmp_path))
    assert third.report.models == {"new": 0, "unchanged": 0}  # skipped unread now
    assert _verify(src, f"mlflow+sqlite:///{db}") == []


PAIR = '[[pair]]\nsource = "a"\ndestination = "b"\n'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[sync]\nworkers = "4"\n' + PAIR, "[sync] workers = '4': expected int"),
        ("[retry]\nattempts = 0\n" + PAIR, "[retry] attempts = 0: too small"),
        ('[[pair]]\nsource = "wandb://a/b"\n', "destination is required"),
        (PAIR + '[pair.filter]\nstates = ["done"]\n', "'done' is not one of"),
        (PAIR + 'experiment = "x/{proj}"\n', "experiment template"),
        ("[sync]\n", "no [[pair]]"),
    ],
)
def test_config_mistakes_are_one_clear_line(tmp_path: Path, body: str, message: str) -> None:
    from trackbridge.errors import UsageError

    cfg = tmp_path / "sync.toml"
    cfg.write_text(body)
    with pytest.raises(UsageError, match=re.escape(message)):
        sy.load_config(cfg)


def test_a_damaged_state_cache_is_rebuilt(tmp_path: Path) -> None:
    state = sy.State(tmp_path, sy.Pair("wandb+offline:///a", "mlflow+sqlite:///b.db"))
    (state.dir / "state.sqlite").write_bytes(b"not a database" * 100)
    state.remember_filtered("wandb:run/p/r", "tok", "has none of the tags x")
    assert state.filtered("wandb:run/p/r", "tok") == "has none of the tags x"
    assert state.filtered("wandb:run/p/r", "other") is None
