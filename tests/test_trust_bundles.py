"""A bundle is untrusted input: crafted bundles may be refused, never followed out of the
bundle, never imported half-checked, and never crash with a traceback.

Each case is run as a user would (the real `trackbridge` command) and the destination is
read back with MLflow's own client; a Hypothesis search throws malformed rows, markers
and Parquet bytes at the bundle reader and watches every file it opens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trackbridge.bundle import blob_relpath
from trackbridge.bundle_reader import BundleSource
from trackbridge.errors import TrackbridgeError
from trackbridge.model import Selection
from trackbridge.trackers.mlflow import common as mc

from tests import factories as f
from tests.conftest import one_line, run_cli

SECRET = b"host secret: must never reach a destination\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A readable file outside every bundle: what an attacker would want copied."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_bytes(SECRET)
    return d / "secret.txt"


def _marker(bundle: Path, key: str) -> tuple[Path, dict]:
    for m in sorted((bundle / "_complete").glob("run-*.json")):
        body = json.loads(m.read_text())
        if body["key"] == key:
            return m, body
    raise AssertionError(key)


def _rewrite(bundle: Path, key: str, table: str, change) -> None:
    """Change one table of a run and fix its marker, as an attacker crafting a bundle would."""
    marker, body = _marker(bundle, key)
    path = bundle / body["tables"][table]["file"]
    tbl = change(pq.read_table(path))
    pq.write_table(tbl, path)
    body["tables"][table].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), rows=tbl.num_rows)
    marker.write_text(json.dumps(body))


def _set_column(name: str, value: object):
    def change(tbl: pa.Table) -> pa.Table:
        i = tbl.schema.get_field_index(name)
        return tbl.set_column(
            i, tbl.schema.field(i), pa.array([value] * tbl.num_rows, tbl.schema.field(i).type)
        )

    return change


def _blob(bundle: Path) -> Path:
    _, body = _marker(bundle, "test:run/a")
    return bundle / blob_relpath(body["blobs"][0])


def _dest_state(db: Path) -> dict[str, dict]:
    """Run source key -> fingerprint and artifact bytes, read back with MLflow's client."""
    client = mc.client(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("limits")
    out = {}
    for r in client.search_runs([exp.experiment_id]) if exp else []:
        files = {}
        root = Path(r.info.artifact_uri.removeprefix("file://"))
        for p in root.rglob("*") if root.exists() else []:
            if p.is_file():
                files[p.relative_to(root).as_posix()] = p.read_bytes()
        out[r.data.tags[mc.TAG_SOURCE_KEY]] = {
            "complete": "fingerprint" in mc.run_state(r.data.tags),
            "files": files,
        }
    return out


def _assert_no_secret(tmp_path: Path) -> None:
    """Nothing outside the attacker's own files (the bundle, the outside folder) holds
    the secret: not the destination store, not its artifacts."""
    for parent, dirs, files in os.walk(tmp_path):
        dirs[:] = [d for d in dirs if not (Path(parent) / d).is_symlink()]
        if Path(parent).is_relative_to(tmp_path / "outside") or Path(parent).is_relative_to(
            tmp_path / "bundle"
        ):
            continue
        for name in files:
            p = Path(parent) / name
            if not p.is_symlink():
                assert SECRET not in p.read_bytes(), p


@pytest.mark.parametrize(
    "digest",
    ["../../../../../../etc/passwd", "OUTSIDE", "A" * 64, "ab" * 31 + "x/"],
    ids=["traversal", "outside", "upper-hex", "slash"],
)
def test_a_digest_that_is_not_one_is_refused_by_import_and_check(bundle, tmp_path, outside, digest):
    digest = str(outside) if digest == "OUTSIDE" else digest
    _rewrite(bundle, "test:run/a", "artifact_files", _set_column("sha256", digest))
    db = tmp_path / "d.db"
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{db}", check=1)
    line = one_line(p.stderr)
    assert "run test:run/a failed" in line and "is not a SHA-256 digest" in line
    state = _dest_state(db)
    assert state["test:run/b"]["complete"]
    assert "test:run/a" not in state  # refused when read, before anything was written
    p = run_cli("inspect", str(bundle), "--check", check=3)
    assert "is not a SHA-256 digest" in one_line(p.stderr)
    _assert_no_secret(tmp_path)


def test_a_symlinked_blob_is_not_followed_even_when_its_target_matches(bundle, tmp_path, outside):
    blob = _blob(bundle)
    # the link's target even has the right bytes: a link is refused for what it is
    target = tmp_path / "outside" / "copy.bin"
    shutil.copyfile(blob, target)
    blob.unlink()
    blob.symlink_to(target)
    db = tmp_path / "d.db"
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{db}", check=1)
    line = one_line(p.stderr)
    assert "is a symbolic link" in line and "test:run/a" in line
    assert "test:run/a" not in _dest_state(db)  # whole or not at all
    p = run_cli("inspect", str(bundle), "--check", check=3)
    assert "is a symbolic link" in one_line(p.stderr)


def test_a_symlinked_folder_on_the_blob_path_is_not_followed(bundle, tmp_path, outside):
    blob = _blob(bundle)
    level = blob.parent  # blobs/sha256/ab/cd
    fake = tmp_path / "outside" / "cd"
    fake.mkdir()
    (fake / blob.name).write_bytes(SECRET)
    shutil.rmtree(level)
    level.symlink_to(fake)
    p = run_cli("inspect", str(bundle), "--check", check=3)
    assert "is a symbolic link" in one_line(p.stderr)
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{tmp_path / 'd.db'}", check=1)
    assert "is a symbolic link" in one_line(p.stderr)
    _assert_no_secret(tmp_path)


def test_a_blob_flipped_by_one_byte_fails_its_run_unmarked_withone_line(bundle, tmp_path):
    blob = _blob(bundle)
    data = bytearray(blob.read_bytes())
    data[7] ^= 0x01
    blob.write_bytes(bytes(data))
    db = tmp_path / "d.db"
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{db}", check=1)
    line = one_line(p.stderr)
    assert str(blob) in line and "corrupt blob" in line and "test:run/a" in line
    assert "1 new" in p.stdout and "1 failed" in p.stdout
    state = _dest_state(db)
    # nothing of it: a new run goes into an SQLite store whole or not at all
    assert "test:run/a" not in state and state["test:run/b"]["complete"]
    p = run_cli("inspect", str(bundle), "--check", check=3)
    assert "corrupt blob" in one_line(p.stderr)
    # repaired, the next import completes the run with the right bytes and nothing twice
    data[7] ^= 0x01
    blob.write_bytes(bytes(data))
    run_cli("import", str(bundle), f"mlflow+sqlite:///{db}")
    state = _dest_state(db)
    assert state["test:run/a"]["complete"]
    assert state["test:run/a"]["files"]["model/weights.bin"] == bytes(data)


def test_a_missing_blob(bundle, tmp_path):
    _blob(bundle).unlink()
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{tmp_path / 'd.db'}", check=1)
    assert "blob missing from the bundle" in one_line(p.stderr)
    state = _dest_state(tmp_path / "d.db")
    assert "test:run/a" not in state and state["test:run/b"]["complete"]  # whole or not at all
    p = run_cli("inspect", str(bundle), "--check", check=3)
    assert "blob missing" in one_line(p.stderr)


@pytest.mark.parametrize("path", ["/etc/passwd", "../../outside/secret.txt", "model/../../../x"])
def test_traversal_and_absolute_paths_in_file_rows(bundle, tmp_path, path):
    _rewrite(bundle, "test:run/a", "artifact_files", _set_column("path", path))
    p = run_cli("inspect", str(bundle), "--check", check=3)
    assert "escapes its folder" in one_line(p.stderr)
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{tmp_path / 'd.db'}", check=1)
    assert "escapes its folder" in one_line(p.stderr)
    state = _dest_state(tmp_path / "d.db")
    assert "test:run/a" not in state and state["test:run/b"]["complete"]
    _assert_no_secret(tmp_path)


@pytest.mark.parametrize("field", ["file", "blobs"])
def test_traversal_in_a_marker(bundle, tmp_path, outside, field):
    marker, body = _marker(bundle, "test:run/a")
    if field == "file":
        body["tables"]["params"]["file"] = "../outside/secret.txt"
    else:
        body["blobs"] = ["../../../outside/secret.txt"]
    marker.write_text(json.dumps(body))
    p = run_cli("inspect", str(bundle), "--check", check=3)
    line = one_line(p.stderr)
    assert str(marker) in line and ("escapes its folder" in line or "is not a SHA-256 digest" in line)
    p = run_cli("import", str(bundle), f"mlflow+sqlite:///{tmp_path / 'd.db'}", check=3)
    assert str(marker) in one_line(p.stderr)
    assert not (tmp_path / "d.db").exists() or not _dest_state(tmp_path / "d.db")


def test_a_manifest_that_lies_about_counts_fails_the_check(bundle, tmp_path):
    man = bundle / "manifest.json"
    body = json.loads(man.read_text())
    body["counts"]["metrics"] += 1000
    man.write_text(json.dumps(body))
    p = run_cli("inspect", str(bundle), "--check", check=3)
    line = one_line(p.stderr)
    assert "manifest.json: counts" in line and "metrics" in line
    # an import trusts the units and their checksums, never the manifest's numbers
    run_cli("import", str(bundle), f"mlflow+sqlite:///{tmp_path / 'd.db'}")
    state = _dest_state(tmp_path / "d.db")
    assert state["test:run/a"]["complete"] and state["test:run/b"]["complete"]


def test_a_marker_that_lies_about_rows(bundle, tmp_path):
    marker, body = _marker(bundle, "test:run/a")
    body["tables"]["metrics"]["rows"] = 7
    marker.write_text(json.dumps(body))
    p = run_cli("inspect", str(bundle), "--check", check=3)
    assert "holds 2500 rows, its marker says 7" in one_line(p.stderr)


@pytest.mark.parametrize("small", [8 << 20, 0], ids=["read-at-once", "streamed"])
def test_a_table_file_is_checked_whichever_way_it_is_read(bundle, monkeypatch, small):
    """A small table file is hashed and parsed from the same bytes in memory, a large one
    hashed as it streams and parsed from disk: both give the file's rows, and both refuse
    the file once one byte of it changes."""
    from trackbridge import bundle_reader, schema
    from trackbridge.errors import BadInputError

    monkeypatch.setattr(bundle_reader, "SMALL_TABLE", small)
    src = BundleSource(bundle)
    runs = src.runs(Selection(), src.projects(Selection()))
    for r in runs:
        _, body = _marker(bundle, r["run_key"])
        payload = src.read_run(r)
        on_disk = pq.read_table(bundle / body["tables"]["metrics"]["file"]).cast(schema.SCHEMAS["metrics"])
        assert pa.Table.from_batches(list(payload.metrics()), on_disk.schema).equals(on_disk)
        if "params" in body["tables"]:
            assert payload.params.equals(
                pq.read_table(bundle / body["tables"]["params"]["file"]).cast(schema.SCHEMAS["params"])
            )
    _, body = _marker(bundle, "test:run/a")
    for table in ("metrics", "params"):
        path = bundle / body["tables"][table]["file"]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    run_a = next(r for r in runs if r["run_key"] == "test:run/a")
    with pytest.raises(BadInputError, match=r"params.*checksum mismatch"):
        src.read_run(run_a)
    monkeypatch.setattr(src, "read_table", lambda m, name: schema.empty(name))  # the params aside
    with pytest.raises(BadInputError, match=r"metrics.*checksum mismatch"):
        list(src.read_run(run_a).metrics())


# --------------------------------------------------------------------------- fuzzing

# what Python itself may read while the reader runs: modules it imports late, time zones
_ALLOWED_PREFIXES = tuple(
    {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.__file__), "/usr/share/zoneinfo"}
)


class _Opens:
    """Every file Python opens while active (an audit hook: one per process, so it stays
    installed and only records when switched on)."""

    active = False
    seen: ClassVar[list[tuple[str, bool]]] = []

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.active and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            mode = args[1] if isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writes = any(c in mode for c in "wax+") or bool(flags & (os.O_WRONLY | os.O_RDWR))
            cls.seen.append((os.path.realpath(path), writes))


sys.addaudithook(_Opens.hook)


def _reads_everything(root: Path) -> None:
    src = BundleSource(root, verify_checksums=True)
    src.check()
    projects = src.projects(Selection())
    for r in src.runs(Selection(), projects):
        payload = src.read_run(r)
        for _ in payload.metrics():
            pass
        for a in payload.artifacts:
            for fr in a.files:
                if fr.sha256 is not None:
                    with fr.fetch() as local:
                        assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == fr.sha256


# examples per search in CI; TRACKBRIDGE_FUZZ_EXAMPLES=5000 searches deeper by hand
_EXAMPLES = int(os.environ.get("TRACKBRIDGE_FUZZ_EXAMPLES", "150"))

_text = st.one_of(
    st.sampled_from(
        ["../../outside/secret.txt", "/etc/passwd", "..", ".", "", "a/../..", "x\x00y", "ok.bin"]
    ),
    st.text(max_size=70),
)
_digests = st.one_of(
    st.none(),
    st.sampled_from(["../../../outside/secret.txt", "0" * 64, "f" * 63, "F" * 64]),
    st.text(alphabet="0123456789abcdef./", min_size=60, max_size=66),
)
_rows = st.lists(
    st.fixed_dictionaries(
        {
            "path": _text,
            "size": st.one_of(st.none(), st.integers(min_value=-(2**40), max_value=2**40)),
            "sha256": _digests,
            "uri": st.one_of(st.none(), st.sampled_from(["s3://b/k", "file:///etc/passwd"])),
        }
    ),
    min_size=1,
    max_size=4,
)


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    src = d / "w.bin"
    src.write_bytes(b"fuzz" * 100)
    pl = f.payload(f.run("test:run/a"), points=[("l", 0, 1.0)], files=[f.file_ref("w.bin", src)])
    secret = d / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    return f.write_bundle(d / "bundle", [f.project()], [pl])


def _fuzz_copy(base: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="fuzz-", dir=base.parent))
    shutil.copytree(base, work / "bundle")
    return work / "bundle"


def _only_inside(root: Path) -> None:
    inside = os.path.realpath(root)
    for path, writes in _Opens.seen:
        if path.startswith(_ALLOWED_PREFIXES) and not writes:
            continue  # Python importing a module it had not needed yet
        ok = path == inside or path.startswith(inside + os.sep)
        # the reader's own private copies of checked blobs (bundle.verified_blob)
        ok = ok or any(
            os.path.basename(p).startswith("trackbridge-blob-") for p in (path, os.path.dirname(path))
        )
        assert ok, f"opened {'for writing ' if writes else ''}{path}, outside the bundle"


def _run_fuzz(root: Path) -> None:
    _Opens.seen = []
    _Opens.active = True
    try:
        _reads_everything(root)
    except TrackbridgeError:
        pass  # refused in one line: what a crafted bundle should get
    finally:
        _Opens.active = False
        _only_inside(root)
        shutil.rmtree(root.parent, ignore_errors=True)


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows)
def test_fuzz_file_rows(base_bundle: Path, rows: list[dict]) -> None:
    root = _fuzz_copy(base_bundle)

    def change(tbl: pa.Table) -> pa.Table:
        n = len(rows)
        return pa.table(
            {
                "artifact_key": ["test:run/a#files"] * n,
                "path": [r["path"] for r in rows],
                "size": pa.array([r["size"] for r in rows], pa.int64()),
                "sha256": [r["sha256"] for r in rows],
                "uri": [r["uri"] for r in rows],
            },
            schema=tbl.schema,
        )

    try:
        _rewrite(root, "test:run/a", "artifact_files", change)
    except (ValueError, pa.ArrowException):
        shutil.rmtree(root.parent, ignore_errors=True)
        return  # Arrow itself refuses to write it (a NUL in a path): nothing to read
    _run_fuzz(root)


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=_EXAMPLES, deadline=None)
@given(
    field=st.sampled_from(["tables", "blobs", "kind", "key", "schema_version", "whole", "table-entry"]),
    value=_json,
)
def test_fuzz_markers(base_bundle: Path, field: str, value: object) -> None:
    root = _fuzz_copy(base_bundle)
    marker, body = _marker(root, "test:run/a")
    if field == "whole":
        body = value
    elif field == "table-entry":
        body["tables"]["metrics"] = value
    else:
        body[field] = value
    marker.write_text(json.dumps(body))
    _run_fuzz(root)


@settings(max_examples=max(1, _EXAMPLES // 2), deadline=None)
@given(data=st.binary(max_size=600), which=st.sampled_from(["metrics", "params", "artifact_files", "runs"]))
def test_fuzz_parquet_bytes_with_a_matching_checksum(base_bundle: Path, data: bytes, which: str) -> None:
    root = _fuzz_copy(base_bundle)
    marker, body = _marker(root, "test:run/a")
    entry = body["tables"].get(which)
    if entry is None:
        entry = body["tables"][which] = {"file": f"{which}/x.parquet", "rows": 1}
    path = root / entry["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1" + data + b"PAR1" if data[:1] == b"\x00" else data)
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    marker.write_text(json.dumps(body))
    _run_fuzz(root)
