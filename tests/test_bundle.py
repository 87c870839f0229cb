"""The bundle: manifest, checksums, atomic units, and reading it with pandas and DuckDB."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from trackbridge import schema
from trackbridge.bundle import BundleWriter, blob_relpath
from trackbridge.bundle_reader import BundleSource
from trackbridge.errors import UsageError
from trackbridge.files import sha256_file
from trackbridge.model import Selection
from trackbridge.report import Report
from trackbridge.uri import parse, redact

from tests import factories as f

DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"


@pytest.fixture
def two_runs(tmp_path: Path) -> Path:
    blob = tmp_path / "w.bin"
    blob.write_bytes(bytes(range(256)) * 10)
    a = f.payload(
        f.run("test:run/a"),
        params=[(["opt", "lr"], 0.1), (["opt.lr"], "x"), (["n"], None)],
        points=[("loss", 2, 0.5), ("loss", 0, float("nan")), ("acc", 1, 0.9), ("loss", 2, 0.4)],
        files=[f.file_ref("w.bin", blob), f.file_ref("copy/w.bin", blob)],
    )
    b = f.payload(f.run("test:run/b"), points=[("loss", 0, 1.0)])
    return f.write_bundle(tmp_path / "bundle", [f.project()], [a, b], source="mlflow+http://127.0.0.1:5000")


def test_manifest_counts_and_checksums(two_runs):
    m = json.loads((two_runs / "manifest.json").read_text())
    assert m["format"] == "trackbridge-bundle" and m["schema_version"] == schema.SCHEMA_VERSION
    assert m["producer"].startswith("trackbridge ") and m["complete"] is True
    assert m["counts"]["runs"] == 2 and m["counts"]["metrics"] == 5 and m["counts"]["params"] == 3
    assert m["blobs"] == {"count": 1, "bytes": 2560}  # two paths, one content, stored once
    for rel, digest in m["checksums"].items():
        assert sha256_file(two_runs / rel) == digest


def test_round_trip_keeps_types_paths_order_and_nan(two_runs):
    src = BundleSource(two_runs)
    runs = src.runs(Selection(), src.projects(Selection()))
    a = src.read_run(next(r for r in runs if r["run_key"] == "test:run/a"))
    params = {tuple(p["path"]): (p["value_json"], p["value_type"]) for p in a.params.to_pylist()}
    assert params == {("opt", "lr"): ("0.1", "float"), ("opt.lr",): ('"x"', "str"), ("n",): ("null", "null")}
    pts = [(r["key"], r["step"], r["value"]) for b in a.metrics() for r in b.to_pylist()]
    assert [p[:2] for p in pts] == [("acc", 1), ("loss", 0), ("loss", 2), ("loss", 2)]  # sorted
    assert math.isnan(pts[1][2])
    files = {fr.path: fr for art in a.artifacts for fr in art.files}
    assert set(files) == {"w.bin", "copy/w.bin"}
    with files["copy/w.bin"].fetch() as local:
        assert Path(local).read_bytes() == bytes(range(256)) * 10
    assert (
        a.fingerprint
        and a.fingerprint == src.read_run(next(r for r in runs if r["run_key"] == "test:run/a")).fingerprint
    )


def _keys(bundle: Path) -> list[str]:
    src = BundleSource(bundle)
    return [r["run_key"] for r in src.runs(Selection(), src.projects(Selection()))]


def test_a_new_run_killed_mid_write_is_invisible(two_runs):
    w = BundleWriter(two_runs)
    w.begin("mlflow+http://127.0.0.1:5000")

    def exploding():
        yield f.metrics("test:run/c", [("loss", 0, 1.0)])
        raise KeyboardInterrupt("killed")

    pl = f.payload(f.run("test:run/c"))
    pl.metrics = exploding
    with pytest.raises(KeyboardInterrupt):
        w.write_run(pl, Report().run("test:run/c"))
    assert _keys(two_runs) == ["test:run/a", "test:run/b"]
    assert BundleSource(two_runs).complete is False  # begin() marked the bundle as being written


def test_a_rewrite_killed_while_writing_files_hides_the_unit(two_runs, monkeypatch):
    """Once the marker is gone the unit is invisible: never half old, half new."""
    import trackbridge.bundle as bundle_mod

    calls = {"n": 0}
    real = bundle_mod.pq.write_table

    def dying(tbl, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(tbl, where, **kw)

    monkeypatch.setattr(bundle_mod.pq, "write_table", dying)
    w = BundleWriter(two_runs)
    w.begin("mlflow+http://127.0.0.1:5000")
    with pytest.raises(KeyboardInterrupt):
        w.write_run(
            f.payload(f.run("test:run/a"), params=[(["new"], 1)], points=[("x", 0, 1.0)]),
            Report().run("test:run/a"),
        )
    assert _keys(two_runs) == ["test:run/b"]
    assert not list(two_runs.rglob("*.tmp"))  # no temporary files left behind
    monkeypatch.undo()
    BundleWriter(two_runs).write_run(
        f.payload(f.run("test:run/a"), points=[("x", 0, 1.0)]), Report().run("test:run/a")
    )
    assert _keys(two_runs) == ["test:run/a", "test:run/b"]


def test_bundle_of_another_source_is_refused(two_runs):
    with pytest.raises(UsageError, match="holds data from"):
        BundleWriter(two_runs).begin("mlflow+http://other:5000")


def test_blob_layout_is_content_addressed(two_runs):
    files = [p for p in (two_runs / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert len(files) == 1
    p = files[0]
    assert sha256_file(p) == p.name
    assert p.relative_to(two_runs).as_posix() == blob_relpath(p.name)


def _snippet(name: str) -> str:
    text = DOC.read_text()
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"docs/schema.md has no {name} snippet"
    return m.group(1)


def test_docs_duckdb_query_runs_on_a_real_bundle(two_runs, capsys):
    ns = {"bundle": str(two_runs)}
    exec(_snippet("duckdb"), ns)
    assert ns["result"] == [("a", "acc", 1, 1), ("a", "loss", 3, 2), ("b", "loss", 1, 0)]


def test_docs_pandas_snippet_runs_on_a_real_bundle(two_runs):
    ns = {"bundle": str(two_runs)}
    exec(_snippet("pandas"), ns)
    assert len(ns["runs"]) == 2 and len(ns["metrics"]) == 5


def test_credentials_never_reach_the_manifest(tmp_path):
    assert redact("mlflow+https://alice:s3cret@host:8443/x?token=abc") == "mlflow+https://host:8443/x"
    assert redact("postgresql://u:pw@db:5432/mlflow?sslmode=require") == "postgresql://db:5432/mlflow"
    assert redact("mlflow+sqlite:////abs/path.db") == "mlflow+sqlite:////abs/path.db"  # kept exact
    w = BundleWriter(tmp_path / "b")
    w.begin(parse("mlflow+https://alice:s3cret@host:8443").safe)
    w.finish()
    text = (tmp_path / "b" / "manifest.json").read_text()
    assert "s3cret" not in text and "alice" not in text
