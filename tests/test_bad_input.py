"""Bad input gets one line on stderr that names the file, a documented exit code, and no
traceback unless --debug; nothing half-imported is marked complete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from trackbridge.errors import BadInputError
from trackbridge.files import safe_relpath
from trackbridge.trackers.mlflow import common as mc

from tests.conftest import one_line, run_cli


def _marker_of(bundle: Path, table: str) -> tuple[Path, dict, str]:
    for m in sorted((bundle / "_complete").glob("run-*.json")):
        body = json.loads(m.read_text())
        if table in body["tables"] and body["key"] == "test:run/a":
            return m, body, body["tables"][table]["file"]
    raise AssertionError("no such table")


def test_unknown_uri_scheme_is_a_usage_error(tmp_path):
    p = run_cli("migrate", "ftp://example/x", f"mlflow+sqlite:///{tmp_path}/d.db", check=2)
    line = one_line(p.stderr)
    assert "unknown URI scheme 'ftp'" in line and line.startswith("trackbridge: error:")


def test_missing_sources(tmp_path):
    p = run_cli("export", f"mlflow+sqlite:///{tmp_path}/nope.db", str(tmp_path / "b"), check=3)
    assert "no such SQLite file" in one_line(p.stderr)
    p = run_cli("import", str(tmp_path / "no-bundle"), f"mlflow+sqlite:///{tmp_path}/d.db", check=3)
    assert "no such bundle" in one_line(p.stderr)
    assert not (tmp_path / "nope.db").exists()  # looking must not create an empty store


def test_unknown_schema_version(bundle, tmp_path):
    man = bundle / "manifest.json"
    body = json.loads(man.read_text())
    body["schema_version"] = 99
    man.write_text(json.dumps(body))
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{tmp_path}/d.db", check=3)
    line = one_line(p.stderr)
    assert str(man) in line and "schema version 99 is not supported" in line
    p = run_cli("--debug", "inspect", str(bundle), check=3)
    assert "Traceback" in p.stderr  # --debug shows it


def test_unreadable_manifest_names_line_and_column(bundle):
    (bundle / "manifest.json").write_text('{"format": "trackbridge-bundle",\n  "schema_version": }')
    p = run_cli("inspect", str(bundle), check=3)
    assert "manifest.json: line 2 column" in one_line(p.stderr)


def test_corrupt_parquet_fails_that_run_only_and_leaves_it_unmarked(bundle, tmp_path):
    _, _, rel = _marker_of(bundle, "metrics")
    path = bundle / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    dest = f"mlflow+sqlite:///{tmp_path}/d.db"
    p = run_cli("import", str(bundle), dest, check=1)  # 1 = partial: the other run went through
    line = one_line(p.stderr)
    assert str(path) in line and "checksum mismatch" in line
    assert "1 new" in p.stdout and "1 failed" in p.stdout
    client = mc.client(dest.split("+", 1)[1])
    runs = {
        r.data.tags[mc.TAG_SOURCE_KEY]: r
        for r in client.search_runs([client.get_experiment_by_name("limits").experiment_id])
    }
    assert "fingerprint" in mc.run_state(runs["test:run/b"].data.tags)
    assert "test:run/a" not in runs  # not there at all: a new run goes into SQLite whole or not


def test_parquet_that_matches_its_checksum_but_is_not_parquet(bundle, tmp_path):
    marker, body, rel = _marker_of(bundle, "params")
    path = bundle / rel
    path.write_bytes(b"PAR1 this is not really parquet")
    body["tables"]["params"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    marker.write_text(json.dumps(body))
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{tmp_path}/d.db", check=1)
    line = one_line(p.stderr)
    assert str(path) in line and "not a readable Parquet file" in line


def test_artifact_path_that_escapes_its_folder(bundle, tmp_path):
    marker, body, rel = _marker_of(bundle, "artifact_files")
    path = bundle / rel
    tbl = pq.read_table(path)
    tbl = tbl.set_column(
        tbl.schema.get_field_index("path"), "path", [["../../outside/evil.bin"] * tbl.num_rows]
    )
    pq.write_table(tbl, path)
    body["tables"]["artifact_files"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    marker.write_text(json.dumps(body))
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{tmp_path}/d.db", check=1)
    line = one_line(p.stderr)
    assert f"{path} row 0" in line and "'../../outside/evil.bin' escapes its folder" in line
    assert not (tmp_path / "outside").exists()
    p = run_cli("inspect", str(bundle), "--check", check=3)
    assert "escapes its folder" in one_line(p.stderr)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "..", ".", ""])
def test_safe_relpath_refuses(bad):
    with pytest.raises(BadInputError):
        safe_relpath(bad, "here")


def test_safe_relpath_normalises():
    assert safe_relpath("a/./b//c", "here") == "a/b/c"
    assert safe_relpath("a\\b", "here") == "a/b"


def test_help_teaches():
    p = run_cli("--help")
    assert "Exit codes" in p.stdout and "mlflow+sqlite" in p.stdout
    for cmd in ("export", "import", "migrate", "verify", "inspect", "quickstart"):
        assert cmd in p.stdout
    p = run_cli("migrate", "--help")
    assert "--experiment" in p.stdout and "--since" in p.stdout and "--dry-run" in p.stdout


def test_export_only_writes_bundles(demo_store):
    p = run_cli("export", demo_store["tb"], "mlflow+http://127.0.0.1:9", check=2)
    assert "export writes a bundle folder" in one_line(p.stderr)
