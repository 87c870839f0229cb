"""Mistakes in the environment (a destination that cannot be written, a path of the wrong
kind, a missing driver, a dead server) are one line with exit 2 or 5, within seconds,
before any export, with nothing left behind; `--debug` never shows a credential; what a
command leaves behind (files, reports, temporary bundles) is what a user expects."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trackbridge.trackers.mlflow import common as mc
from trackbridge.trackers.wandb.leveldb import RecordLog

from tests.conftest import one_line, run_cli


@pytest.fixture
def read_only(tmp_path: Path):
    """A folder nobody may write into, root included (root ignores mode bits, not the
    immutable attribute)."""
    d = tmp_path / "ro"
    d.mkdir()
    made = []

    def make(path: Path) -> Path:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(path)], check=True)
        else:
            path.chmod(0o555)
        made.append(path)
        assert not os.access(path, os.W_OK)
        return path

    yield make(d), make
    for p in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(p)], check=False)
        else:
            p.chmod(0o755)


def test_a_destination_that_cannot_be_written_is_exit_5_at_once(demo_store, read_only, tmp_path):
    folder, make = read_only
    t0 = time.perf_counter()
    p = run_cli("migrate", demo_store["tb"], f"mlflow+sqlite:///{folder / 'dest.db'}", check=5)
    assert time.perf_counter() - t0 < 30
    line = one_line(p.stderr)
    assert "cannot write into the folder" in line and str(folder) in line
    assert list(folder.iterdir()) == []  # nothing left behind, no .creating file
    # an existing store that cannot be written
    db = tmp_path / "rw" / "dest.db"
    db.parent.mkdir()
    run_cli("migrate", demo_store["tb"], f"mlflow+sqlite:///{db}", "--no-verify")
    make(db)
    p = run_cli("migrate", demo_store["tb"], f"mlflow+sqlite:///{db}", check=5)
    assert "cannot write into the file" in one_line(p.stderr)


def test_a_path_of_the_wrong_kind_is_a_usage_error(demo_store, wandb_demo, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    p = run_cli("migrate", demo_store["tb"], f"wandb+offline://{a_file}", check=2)
    assert f"{a_file} is a file, not a folder" in one_line(p.stderr)
    p = run_cli("migrate", demo_store["tb"], f"wandb+offline://{a_file}/below", check=2)
    assert "is a file, not a folder" in one_line(p.stderr)
    p = run_cli("migrate", f"wandb+offline://{wandb_demo}", f"mlflow+sqlite:///{tmp_path}", check=2)
    assert "is a folder, not an SQLite file" in one_line(p.stderr)
    p = run_cli("export", demo_store["tb"], str(a_file), check=2)
    assert "is a file, not a folder" in one_line(p.stderr)
    p = run_cli("migrate", demo_store["tb"], f"mlflow+sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}", check=2)
    assert "does not exist" in one_line(p.stderr)
    assert not (tmp_path / "no").exists()
    assert a_file.read_text() == "x"


def test_a_percent_encoded_sqlite_path_is_the_file_sqlalchemy_opens(demo_store, tmp_path):
    spaced = tmp_path / "my dir"
    spaced.mkdir()
    uri = f"mlflow+sqlite:///{tmp_path}/my%20dir/dest.db"
    run_cli("migrate", demo_store["tb"], uri)
    assert sorted(p.name for p in spaced.iterdir()) == ["dest-artifacts", "dest.db"]  # no .creating
    assert not (tmp_path / "my%20dir").exists()
    p = run_cli("migrate", demo_store["tb"], uri)
    assert "0 new" in p.stdout and "verify: identical" in p.stdout
    p = run_cli("migrate", demo_store["tb"], f"mlflow+sqlite:///{tmp_path}/no%20dir/dest.db", check=2)
    assert f"{tmp_path}/no dir does not exist" in one_line(p.stderr)
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_a_dead_destination_is_found_before_the_export(demo_store, tmp_path):
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "trackbridge.cli", "migrate", demo_store["tb"], "mlflow+http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(env_tmp)},
        timeout=120,
    )
    assert p.returncode == 5, p.stderr
    assert "cannot write" in one_line(p.stderr)
    assert "runs:" not in p.stdout
    assert list(env_tmp.iterdir()) == []  # its temporary bundle went with it


def test_debug_output_never_shows_a_credential(demo_store, tmp_path):
    p = run_cli("--debug", "migrate", demo_store["tb"], "mlflow+http://alice:s3cr3t-pw@127.0.0.1:9/", check=5)
    assert "Traceback" in p.stderr  # --debug shows it, chained causes included
    assert "s3cr3t-pw" not in p.stderr + p.stdout
    assert "alice" not in p.stderr
    p = run_cli(
        "--debug", "migrate", demo_store["tb"], "mlflow+postgresql://bob:hunter2@127.0.0.1:5/db", check=5
    )
    assert "hunter2" not in p.stderr + p.stdout


def test_a_report_is_written_when_the_command_fails_before_its_first_run(tmp_path):
    report = tmp_path / "r.json"
    p = run_cli(
        "migrate",
        f"mlflow+sqlite:///{tmp_path / 'none.db'}",
        f"mlflow+sqlite:///{tmp_path / 'd.db'}",
        "--report",
        str(report),
        check=3,
    )
    assert "no such SQLite file" in one_line(p.stderr)
    body = json.loads(report.read_text())
    assert body["errors"] and "no such SQLite file" in body["errors"][0]
    p = run_cli(
        "import", str(tmp_path / "nope"), "mlflow+http://127.0.0.1:9", "--report", str(report), check=3
    )
    assert "no such bundle" in json.loads(report.read_text())["errors"][0]
    p = run_cli("migrate", "x", "y", "--report", str(tmp_path / "no" / "r.json"), check=2)
    assert "--report" in one_line(p.stderr)


def test_artifacts_keep_the_mode_a_new_file_gets(wandb_demo, tmp_path):
    db = tmp_path / "d.db"
    run_cli("migrate", f"wandb+offline://{wandb_demo}", f"mlflow+sqlite:///{db}", "--no-verify")
    files = [p for p in (tmp_path / "d-artifacts").rglob("*") if p.is_file()]
    assert files
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == {0o666 & ~umask}, sorted(oct(m) for m in modes)


def test_migrate_reports_what_the_export_noted(wandb_demo, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(wandb_demo, src, symlinks=True)
    log = sorted(src.rglob("offline-run-*/run-*.wandb"))[0]
    offsets = [o for o, _ in RecordLog(log).payloads()]
    with open(log, "r+b") as f:
        f.truncate(offsets[len(offsets) // 2] + 5)  # a killed writer
    report = tmp_path / "r.json"
    p = run_cli(
        "migrate", f"wandb+offline://{src}", f"mlflow+sqlite:///{tmp_path / 'd.db'}", "--report", str(report)
    )
    assert "source-incomplete" in p.stdout, (log, p.stdout)
    kinds = [m["kind"] for r in json.loads(report.read_text())["runs"] for m in r["mappings"]]
    assert "source-incomplete" in kinds


def test_a_killed_migrate_leaves_no_temporary_bundle_for_good(wandb_demo, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    cmd = [sys.executable, "-m", "trackbridge.cli", "migrate", f"wandb+offline://{wandb_demo}"]
    proc = subprocess.Popen([*cmd, f"mlflow+sqlite:///{tmp_path / 'a.db'}"], env=env)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "tmp").glob("trackbridge-migrate-*/bundle/manifest.json")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    stale = list((tmp_path / "tmp").glob("trackbridge-migrate-*"))
    assert len(stale) == 1
    subprocess.run([*cmd, f"mlflow+sqlite:///{tmp_path / 'b.db'}"], env=env, check=True, capture_output=True)
    assert not stale[0].exists()
    assert list((tmp_path / "tmp").glob("trackbridge-migrate-*")) == []


def test_a_spool_folder_that_cannot_be_written_is_one_clear_error(read_only):
    import trackbridge
    from trackbridge.errors import UsageError

    folder, _ = read_only
    with pytest.raises(UsageError, match="cannot write there") as e:
        trackbridge.init(project="p", to=[], spool=folder / "spool")
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_the_store_created_for_a_destination_is_complete_and_beside_its_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    client = mc.client(uri)
    exp = client.get_experiment("0")
    assert exp.artifact_location == (tmp_path / "new-artifacts" / "0").as_uri()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.db"]  # nothing half-built beside it
