"""What every tracker that can be written keeps, checked the same way for each.

The trackers come from the installed declarations (``trackbridge.tracker.registry``),
the tests' own plug-in tracker (``tests/jsonl_tracker.py``, installed through its entry
point) included: a tracker that declares a ``scratch`` destination gets this whole
suite without a line here. Each test writes the same neutral runs (nested and typed
params, tags, labels, NaN, a binary run file, a parent and a child) into a fresh
destination and reads them back with the tracker's own reader:

- a round trip verifies identical;
- a second import adds nothing;
- a write that fails half-way is completed by the next import, with no duplicate;
- a dry run writes nothing;
- verify sees a planted difference;
- damaged input is an error of one line, never a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from trackbridge import engine, tracker
from trackbridge.bundle_reader import BundleSource
from trackbridge.errors import ExitCode, TrackbridgeError
from trackbridge.model import RunPayload, Selection
from trackbridge.uri import open_sink, open_source
from trackbridge.verify import verify

from tests import factories as f
from tests import jsonl_tracker
from tests.conftest import killable_env, one_line

# where the plug-in's distribution metadata is installed for this test session
SITE = Path(tempfile.mkdtemp(prefix="trackbridge-plugin-"))
atexit.register(shutil.rmtree, SITE, True)


@contextlib.contextmanager
def _installed() -> Iterator[dict[str, str]]:
    """The JSON-lines tracker, installed as a separate distribution would be, for this
    process and the commands it starts."""
    env = jsonl_tracker.install(SITE)
    sys.path.insert(0, str(SITE))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    tracker.reload()
    try:
        yield env
    finally:
        sys.path.remove(str(SITE))
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        tracker.reload()


@pytest.fixture(scope="module", autouse=True)
def plugin() -> Iterator[dict[str, str]]:
    with _installed() as env:
        yield env


with _installed():
    WRITABLE = [t.name for t in tracker.registry() if t.scratch is not None and t.capabilities.writes]


def _native_copies(name: str, dest: str) -> Counter:
    """Each source key, counted in the destination as the tracker's own client shows it
    to its users: MLflow's active runs, W&B's run records in the offline folders. A
    bundle and the JSON-lines folder have no client but trackbridge's reader."""
    if name == "mlflow":
        from mlflow import MlflowClient
        from mlflow.entities import ViewType

        client = MlflowClient(dest.removeprefix("mlflow+"))
        exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        runs = client.search_runs(exps, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        return Counter(r.data.tags.get("trackbridge.source_key") for r in runs)
    if name == "wandb":
        from trackbridge.trackers.wandb.runfolder import read_head

        root = Path(dest.removeprefix("wandb+offline://"))
        heads = [read_head(log) for log in root.glob("wandb/offline-run-*/run-*.wandb")]
        assert all(h.error is None for h in heads), [h.error for h in heads]
        return Counter(h.meta.get("source_key") for h in heads)
    back = open_source(dest)
    return Counter(r["run_key"] for r in back.runs(Selection(), back.projects(Selection())))


def _native_file(name: str, dest: str, tmp_path: Path) -> bytes | None:
    """The parent run's ``model/weights.bin`` as the tracker's own client serves it."""
    if name == "mlflow":
        from mlflow import MlflowClient

        client = MlflowClient(dest.removeprefix("mlflow+"))
        exps = [e.experiment_id for e in client.search_experiments()]
        found = "tags.`trackbridge.source_key` = 'test:run/parent'"  # as a user searches
        (run,) = client.search_runs(exps, filter_string=found)
        local = client.download_artifacts(run.info.run_id, "model/weights.bin", str(tmp_path))
        return Path(local).read_bytes()
    if name == "wandb":
        root = Path(dest.removeprefix("wandb+offline://"))
        (path,) = root.glob("wandb/offline-run-*/files/model/weights.bin")
        return path.read_bytes()  # the file ``wandb sync`` uploads
    return None


def _once_each(name: str, dest: str, keys: set[str]) -> None:
    copies = _native_copies(name, dest)
    assert copies == Counter(dict.fromkeys(keys, 1)), copies


def test_the_plugin_is_found_through_its_entry_point_alone():
    assert "jsonl" in WRITABLE and {"mlflow", "wandb", "bundle"} <= set(WRITABLE)
    assert tracker.by_name("jsonl").title.startswith("JSON lines")
    assert "jsonl:///ABS/PATH" in tracker.uri_help()


KEYS = {"test:run/parent", "test:run/child", "test:run/plain"}
WEIGHTS = bytes(range(256)) * 40


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three runs every destination can hold, in a bundle."""
    d = tmp_path_factory.mktemp("conformance")
    blob = d / "weights.bin"
    blob.write_bytes(WEIGHTS)
    parent = f.run("test:run/parent", labels=["baseline"])
    child = f.run("test:run/child", parent_run_key="test:run/parent", status="failed")
    plain = f.run("test:run/plain", notes="a run with notes")
    payloads = [
        f.payload(
            parent,
            params=[(["lr"], 0.001), (["model", "depth"], 18), (["augment"], True), (["opt"], "adam")],
            tags={"team": "vision"},
            points=[("loss", i, 1.0 / (i + 1)) for i in range(300)] + [("acc", 0, float("nan"))],
            files=[f.file_ref("model/weights.bin", blob)],
        ),
        f.payload(child, params=[(["seed"], 7)], points=[("loss", i, float(i)) for i in range(50)]),
        f.payload(plain, tags={"kind": "plain"}, points=[("x", 0, 2.5)]),
    ]
    return str(f.write_bundle(d / "source", [f.project()], payloads))


def _dest(name: str, tmp_path: Path) -> str:
    scratch = tracker.by_name(name).scratch
    assert scratch is not None
    return scratch(tmp_path)


def _copy(src: Any, dest: str, **options: Any) -> Any:
    return engine.copy(src, open_sink(dest, **options), Selection())


def _verify(src: Any, dest: str) -> list[str]:
    diffs, stats = verify(src, open_source(dest), Selection())
    assert stats["runs"] == 3
    return diffs


@pytest.mark.parametrize("name", WRITABLE)
def test_a_round_trip_verifies_and_a_second_import_adds_nothing(name: str, source: str, tmp_path: Path):
    dest = _dest(name, tmp_path)
    first = _copy(BundleSource(source), dest)
    assert first.count("new") == 3 and not first.errors, first
    assert _verify(BundleSource(source), dest) == []
    again = _copy(BundleSource(source), dest)
    # a bundle is a snapshot: exported into again, its runs are rewritten in place
    assert again.count("unchanged" if name != "bundle" else "updated") == 3, again
    _once_each(name, dest, KEYS)
    assert _native_file(name, dest, tmp_path) in (None, WEIGHTS)
    assert _verify(BundleSource(source), dest) == []


class _Failing(BundleSource):
    """A source whose one run breaks off after its first batch of points, as a write
    cut by a dropped connection would."""

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        p = super().read_run(run)
        if run["run_key"] != "test:run/parent":
            return p
        whole = p.metrics

        def broken() -> Iterator[pa.RecordBatch]:
            for b in whole():
                yield b.slice(0, 10)
                raise OSError("connection dropped")

        return replace(p, metrics=broken, fingerprint=None)


@pytest.mark.parametrize("name", WRITABLE)
def test_a_write_that_fails_half_way_is_completed_next_time(name: str, source: str, tmp_path: Path):
    dest = _dest(name, tmp_path)
    broken = _Failing(source)
    sink = open_sink(dest)
    first = engine.copy(broken, sink, Selection())
    failed = sorted(r.run_key for r in first.runs if r.outcome == "failed")
    if getattr(sink, "CHILDREN_WAIT_FOR_PARENTS", False):
        # the child waits for its parent rather than point at a run that is not there
        assert failed == ["test:run/child", "test:run/parent"], [(r.run_key, r.error) for r in first.runs]
        waited = next(r.error for r in first.runs if r.run_key == "test:run/child")
        assert "its parent test:run/parent failed" in waited
    else:
        assert failed == ["test:run/parent"], [(r.run_key, r.error) for r in first.runs]
    second = _copy(BundleSource(source), dest)
    assert second.count("failed") == 0
    assert _verify(BundleSource(source), dest) == []  # verify reports duplicates too
    _once_each(name, dest, KEYS)


@pytest.mark.parametrize("name", WRITABLE)
def test_a_dry_run_writes_nothing(name: str, source: str, tmp_path: Path):
    dest = _dest(name, tmp_path)
    report = engine.copy(BundleSource(source), open_sink(dest, dry_run=True), Selection())
    assert report.count("new") == 3 and sum(r.points for r in report.runs) == 352, report
    try:
        back = open_source(dest)
    except TrackbridgeError:
        return  # nothing there to read: nothing was written
    assert back.runs(Selection(), back.projects(Selection())) == []


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four runs of 5,000 points each: long enough to be killed in the middle of most
    destinations (a JSON-lines or bundle import may be done first: then it is a re-run)."""
    d = tmp_path_factory.mktemp("big")
    payloads = [
        f.payload(
            f.run(f"test:run/big{i}"),
            params=[(["i"], i)],
            points=[(f"k{j % 4}", j // 4, float(j) / (i + 1)) for j in range(5_000)],
        )
        for i in range(4)
    ]
    return str(f.write_bundle(d / "source", [f.project()], payloads))


@pytest.mark.parametrize("name", WRITABLE)
def test_an_import_killed_at_a_random_moment_is_completed_by_the_next(
    name: str, big_source: str, tmp_path: Path, plugin: dict[str, str]
):
    """The real command, killed with SIGKILL once the destination has started to change,
    then run again: every run exactly once, every point, verified."""
    folder = tmp_path / "d"
    folder.mkdir()
    dest = _dest(name, folder)
    env = killable_env(tmp_path, {**os.environ, **plugin, "MLFLOW_DISABLE_TELEMETRY": "true"})
    cmd = [sys.executable, "-m", "trackbridge.cli", "import", big_source, dest]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if sum(x.stat().st_size for x in folder.rglob("*") if x.is_file()) > 0:
            break
        time.sleep(0.05)
    time.sleep(random.uniform(0.1, 1.0))
    killed = p.poll() is None
    p.kill()
    p.wait()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    diffs, stats = verify(BundleSource(big_source), open_source(dest), Selection())
    assert diffs == [] and stats["runs"] == 4 and stats["points"] == 20_000, (killed, diffs)
    _once_each(name, dest, {f"test:run/big{i}" for i in range(4)})


class _Planted(BundleSource):
    """The source with one point changed after the copy."""

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        p = super().read_run(run)
        if run["run_key"] != "test:run/child":
            return p
        whole = p.metrics

        def planted() -> Iterator[pa.RecordBatch]:
            for b in whole():
                values = b.column("value").to_pylist()
                values[len(values) // 2] += 0.5
                i = b.schema.get_field_index("value")
                yield b.set_column(i, "value", pa.array(values, pa.float64()))

        return replace(p, metrics=planted, fingerprint=None)


@pytest.mark.parametrize("name", WRITABLE)
def test_verify_sees_a_planted_difference(name: str, source: str, tmp_path: Path):
    dest = _dest(name, tmp_path)
    _copy(BundleSource(source), dest)
    diffs = _verify(_Planted(source), dest)
    assert len(diffs) == 1 and "metrics differ" in diffs[0], diffs


@pytest.mark.parametrize("name", WRITABLE)
def test_damaged_input_is_one_line(name: str, source: str, tmp_path: Path, plugin: dict[str, str]):
    """The destination written, then the start of its largest file damaged, read as a
    source by the real command: a non-zero exit and single-line errors, no traceback."""
    dest = _dest(name, tmp_path / "d")
    (tmp_path / "d").mkdir()
    _copy(BundleSource(source), dest)
    files = [p for p in (tmp_path / "d").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    # its start: a store without checksums (SQLite) may never read a damaged middle page
    data[0:64] = b"\xff\x00garbage" * 7 + b"\xff"
    victim.write_bytes(bytes(data))
    p = subprocess.run(
        [sys.executable, "-m", "trackbridge.cli", "export", dest, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, **plugin, "MLFLOW_DISABLE_TELEMETRY": "true"},
        timeout=300,
    )
    assert p.returncode in (ExitCode.PARTIAL, ExitCode.BAD_INPUT), f"{victim}: {p.returncode} {p.stderr}"
    line = one_line(p.stderr)
    assert victim.name in line, line  # names the file (and the byte, where it is a format)
