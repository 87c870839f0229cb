"""mlflow-export-import folders as a source (issue 18), restored into MLflow and read
back with MLflow's own client: original start times, histories, files byte for byte,
nested runs, the registry, and nothing twice.

The folders are written by the real tool. Its PyPI releases (1.2.0, and 1.1.2 for the
older 1.x layout) are installed at test time into the test's folder, apart from the
environment (``pip --target``: the two cannot share one), and run against a real
``mlflow server`` on 127.0.0.1, through which alone they export the registry. The newest
layout is only in the tool's GitHub source, which CI cannot reach: its output is kept in
``tests/fixtures/mlflow-export-import-2/`` beside a bundle of its source store
(``tests/fixtures/make_mlflow_export_import.py`` made both).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trackbridge.trackers.mlflow import common as mc
from trackbridge.trackers.mlflow.demo import make_mlflow_demo
from trackbridge.trackers.mlflow.server import LocalMlflowServer

from tests.conftest import one_line, run_cli

LAYOUT_2 = Path(__file__).parent / "fixtures" / "mlflow-export-import-2"
RELEASES = ("1.2.0", "1.1.2")
# (name, release, the tool's module, its options): each a folder the tests restore
EXPORTS = (
    ("1.2.0-all", "1.2.0", "bulk.export_all", []),
    ("1.2.0-experiment", "1.2.0", "experiment.export_experiment", ["--experiment", "demo-classifier"]),
    ("1.2.0-experiments", "1.2.0", "bulk.export_experiments", ["--experiments", "all"]),
    ("1.2.0-models", "1.2.0", "bulk.export_models", ["--models", "all"]),
    ("1.1.2-all", "1.1.2", "bulk.export_all", []),
    ("1.1.2-source-tags", "1.1.2", "bulk.export_all", ["--export-source-tags", "true"]),
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store of what MLflow 2 could hold (the releases on PyPI predate MLflow 3's
    logged models and cannot export a version made from one), and each export of it."""
    root = tmp_path_factory.mktemp("mei")
    for release in RELEASES:
        tool = [f"mlflow-export-import=={release}", "shortuuid", "tabulate"]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", root / release, *tool],
            check=True,
        )
    db = root / "source.db"
    ids = make_mlflow_demo(f"sqlite:///{db}", legacy=True)
    env = {**os.environ, "HOME": str(root)}
    out = {"db": db, "uri": f"mlflow+sqlite:///{db}", "ids": ids, "tools": root}
    with LocalMlflowServer(root / "server", backend=f"sqlite:///{db}", env=env) as url:
        for name, release, module, options in EXPORTS:
            folder = root / name
            subprocess.run(
                [sys.executable, "-m", f"mlflow_export_import.{module}", "--output-dir", folder, *options],
                env={**env, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(root / release)},
                cwd=root,
                check=True,
                capture_output=True,
            )
            out[name] = folder
    return out


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _runs(uri: str, deleted: bool = True, experiment: str | None = None) -> dict[str, object]:
    """A store's runs by the run id they came from (a copy's source key names it)."""
    from mlflow.entities import ViewType

    client = mc.client(uri)
    exps = [
        e.experiment_id
        for e in client.search_experiments(view_type=ViewType.ALL)
        if experiment in (None, e.name)
    ]
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    out: dict[str, object] = {}
    for r in client.search_runs(exps, run_view_type=view, max_results=1000):
        key = r.data.tags.get(mc.TAG_SOURCE_KEY, f"mlflow:run/{r.info.run_id}").removeprefix("mlflow:run/")
        assert key not in out, f"{key} is in {uri} twice"
        out[key] = r
    return out


def _same_as_original(
    original: str, dest: str, tmp_path: Path, deleted: bool, experiment: str | None = None
) -> None:
    """What a user of the restored store sees, against the original, run by run."""
    src, dst = mc.client(original), mc.client(dest)
    originals, copies = _runs(original, deleted, experiment), _runs(dest)
    assert sorted(copies) == sorted(originals)
    here = {r.info.run_id: key for key, r in originals.items()}
    for key, r in originals.items():
        c = copies[key]
        # the times mlflow-export-import's own import resets (its issues #72 and #238)
        assert (c.info.start_time, c.info.end_time) == (r.info.start_time, r.info.end_time), r.info.run_name
        assert (c.info.status, c.info.user_id, c.info.run_name) == (
            r.info.status,
            r.info.user_id,
            r.info.run_name,
        )
        assert c.info.lifecycle_stage == r.info.lifecycle_stage
        assert c.data.params == r.data.params
        tags = [{k: v for k, v in mc.user_tags(x.data.tags).items() if k != mc.TAG_PARENT} for x in (c, r)]
        assert tags[0] == tags[1]
        parent = r.data.tags.get(mc.TAG_PARENT)
        if parent:  # nested under the parent's copy
            assert c.data.tags[mc.TAG_PARENT] == copies[here[parent]].info.run_id
        for k in r.data.metrics:
            want = [(m.step, m.timestamp, repr(m.value)) for m in src.get_metric_history(r.info.run_id, k)]
            got = [(m.step, m.timestamp, repr(m.value)) for m in dst.get_metric_history(c.info.run_id, k)]
            assert sorted(got) == sorted(want), (r.info.run_name, k)
        for f in mc.walk_artifacts(lambda p, rid=r.info.run_id: src.list_artifacts(rid, p)):
            a = src.download_artifacts(r.info.run_id, f.path, str(tmp_path / "a" / key))
            b = dst.download_artifacts(c.info.run_id, f.path, str(tmp_path / "b" / key))
            assert _sha(a) == _sha(b), f.path


@pytest.mark.parametrize("name", [e[0] for e in EXPORTS if e[0] != "1.2.0-models"])
def test_an_export_of_each_release_restores_as_the_original_store(
    exported: dict, name: str, new_sqlite: str, tmp_path: Path
) -> None:
    single = name.endswith("-experiment")
    registry = name.endswith("-all")  # export-experiment(s) leave the registry out
    p = run_cli("migrate", f"mlflow-export-import://{exported[name]}", new_sqlite)
    assert "runs: 4 new" in p.stdout if single else "runs: 5 new" in p.stdout, p.stdout
    # the releases on PyPI leave deleted runs out
    narrow = ["--experiment", "demo-classifier"] if single else []
    narrow += [] if registry else ["--no-registry"]
    p = run_cli("verify", "--skip-deleted", *narrow, exported["uri"], new_sqlite)
    assert "verify: identical" in p.stdout, p.stdout
    original, dest = exported["uri"].removeprefix("mlflow+"), new_sqlite.removeprefix("mlflow+")
    _same_as_original(original, dest, tmp_path, False, "demo-classifier" if single else None)
    if registry:
        dst = mc.client(new_sqlite.removeprefix("mlflow+"))
        model = dst.get_registered_model("demo-classifier")
        assert model.aliases == {"baseline": 1, "champion": 2}
        assert model.description == "The demo's image classifier"
        v1 = dst.get_model_version("demo-classifier", "1")
        assert (v1.current_stage, mc.user_tags(v1.tags), v1.description) == (
            "Staging",
            {"validated": "yes"},
            "from run files",
        )
        trial = _runs(new_sqlite.removeprefix("mlflow+"))[exported["ids"]["runs"]["trial-0"]]
        assert v1.run_id == trial.info.run_id
    again = run_cli("migrate", f"mlflow-export-import://{exported[name]}", new_sqlite)
    assert " 0 new, 0 updated" in again.stdout, again.stdout


def test_an_export_of_the_registry_restores_its_versions_and_their_runs(
    exported: dict, new_sqlite: str
) -> None:
    """export-models takes the versions' runs, not their parents: the nesting that cannot
    be set is reported, and verify names it (exit 4), as for any run moved alone."""
    p = run_cli("migrate", f"mlflow-export-import://{exported['1.2.0-models']}", new_sqlite, check=4)
    assert "runs: 1 new" in p.stdout and "model versions: 2 new" in p.stdout, p.stdout
    assert "parent-missing" in p.stdout, p.stdout
    trial = exported["ids"]["runs"]["trial-0"]
    p = run_cli(
        "verify", "--run", trial, "--experiment", "demo-classifier", exported["uri"], new_sqlite, check=4
    )
    assert "verify: 1 difference(s)" in p.stderr and "parent" in p.stdout, p.stdout
    dst = mc.client(new_sqlite.removeprefix("mlflow+"))
    copy = _runs(new_sqlite.removeprefix("mlflow+"))[trial]
    versions = dst.search_model_versions("name='demo-classifier'")
    assert sorted((str(v.version), v.run_id) for v in versions) == [
        ("1", copy.info.run_id),
        ("2", copy.info.run_id),
    ]
    assert dst.get_registered_model("demo-classifier").aliases == {"baseline": 1, "champion": 2}


def test_a_restore_over_a_migration_of_the_same_server_adds_nothing(exported: dict, new_sqlite: str) -> None:
    """The export keeps the live server's keys: a team that migrated from the server, and
    later restores a backup of it, gets each run once."""
    run_cli("migrate", exported["uri"], new_sqlite)
    p = run_cli("migrate", f"mlflow-export-import://{exported['1.2.0-all']}", new_sqlite)
    assert "0 new" in p.stdout and "0 failed" in p.stdout, p.stdout
    assert len(_runs(new_sqlite.removeprefix("mlflow+"))) == 6  # the deleted run came from the server


def test_an_export_restores_into_wandb_offline(exported: dict, tmp_path: Path) -> None:
    wb = f"wandb+offline://{tmp_path / 'wb'}"
    only = ("--experiment", "demo-classifier", "--experiment", "demo-regression")
    # W&B has no empty project and no registry to write (docs/fidelity.md)
    run_cli("migrate", f"mlflow-export-import://{exported['1.2.0-all']}", wb, *only, "--no-registry")
    p = run_cli(
        "verify",
        *(
            "--skip-deleted",
            "--no-registry",
            "--experiment",
            "demo-classifier",
            "--experiment",
            "demo-regression",
        ),
        exported["uri"],
        wb,
    )
    assert "verify: identical (2 projects, 5 runs" in p.stdout, p.stdout
    # as W&B's own record classes read the files `wandb sync` sends: each run once, and
    # its original start time where the SDK, which sets its own, leaves room for it
    # (config._trackbridge, docs/fidelity.md)
    from trackbridge.trackers.wandb.leveldb import RecordLog
    from wandb.proto import wandb_internal_pb2 as pb

    started: dict[str, int] = {}
    for log in (tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb"):
        rec = pb.Record()
        for _, payload in RecordLog(log).payloads():
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "run":
                kept = next(
                    json.loads(i.value_json) for i in rec.run.config.update if i.key == "_trackbridge"
                )
                run_id = kept["source_key"].removeprefix("mlflow:run/")
                assert run_id not in started, f"{run_id} written twice"
                started[run_id] = round(kept["start_time"] * 1000)
                break
    original = _runs(exported["uri"].removeprefix("mlflow+"), deleted=False)
    assert started == {rid: r.info.start_time for rid, r in original.items()}


def test_runs_trackbridge_wrote_come_back_exact_from_a_backup(
    exported: dict, wandb_demo: Path, tmp_path: Path
) -> None:
    """W&B → an MLflow server → mlflow-export-import 1.2.0 → MLflow: what trackbridge had
    to map to fit MLflow (kept in the runs' own trackbridge/ files) is restored from the
    folder as from the server. A run whose W&B model trackbridge made an MLflow logged
    model cannot be restored from a release that exports none: it fails, saying so."""
    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    with LocalMlflowServer(tmp_path / "server") as url:
        run_cli("migrate", f"wandb+offline://{wandb_demo}", f"mlflow+{url}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlflow_export_import.bulk.export_all",
                "--output-dir",
                tmp_path / "backup",
            ],
            env={**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(exported["tools"] / "1.2.0")},
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )
        p = run_cli("migrate", f"mlflow-export-import://{tmp_path / 'backup'}", dest, check=1)
        assert "runs: 2 new, 0 updated, 0 unchanged, 1 failed" in p.stdout, p.stdout
        assert "(baseline): artifact 'demo-classifier': its files" in p.stdout, p.stdout
        assert "an MLflow logged model, which this export does not hold" in p.stdout
        assert "value-truncated params.vocab" in p.stdout  # mapped again, from the full value
        only = [x for rid in _runs(dest.removeprefix("mlflow+")) for x in ("--run", rid)]
        p = run_cli("verify", *only, "--no-registry", f"mlflow+{url}", dest)
        assert "verify: identical (2 projects, 2 runs" in p.stdout, p.stdout


@pytest.fixture(scope="module")
def layout_2_original(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The store the kept export was made from, back in an MLflow store from its bundle."""
    uri = f"mlflow+sqlite:///{tmp_path_factory.mktemp('orig') / 'orig.db'}"
    run_cli("migrate", str(LAYOUT_2 / "source"), uri)
    return uri


def test_the_newest_layout_restores_logged_models_deleted_runs_and_the_registry(
    layout_2_original: str, new_sqlite: str, tmp_path: Path
) -> None:
    export = LAYOUT_2 / "export"
    p = run_cli("migrate", f"mlflow-export-import://{export}", new_sqlite)
    assert "runs: 6 new" in p.stdout and "model versions: 2 new" in p.stdout, p.stdout
    p = run_cli("verify", str(LAYOUT_2 / "source"), new_sqlite)
    assert "verify: identical (3 projects, 6 runs, 110 points, 2 model versions)" in p.stdout, p.stdout
    dest = new_sqlite.removeprefix("mlflow+")
    _same_as_original(layout_2_original.removeprefix("mlflow+"), dest, tmp_path, True)
    copies = _runs(dest)
    for run_json in export.glob("experiments/*/runs/*/run.json"):  # the times the file holds
        info = json.loads(run_json.read_text())["mlflow"]["info"]
        assert copies[info["run_id"]].info.start_time == info["start_time"]
    dst = mc.client(dest)
    (lm_file,) = export.glob("experiments/*/logged_models/*/logged_model.json")
    lm = json.loads(lm_file.read_text())["mlflow"]
    (model,) = dst.search_logged_models([copies[lm["source_run_id"]].info.experiment_id])
    assert (model.name, model.params) == ("resnet", {"depth": "18"})
    assert mc.user_tags(model.tags) == {"framework": "torch"}
    assert model.source_run_id == copies[lm["source_run_id"]].info.run_id
    got = mc.walk_artifacts(lambda p: dst.list_logged_model_artifacts(model.model_id, p))
    assert [f.path for f in got] == ["MLmodel"]
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        f"{model.artifact_location}/MLmodel", dst_path=str(tmp_path / "m")
    )
    assert _sha(local) == _sha(lm_file.parent / "artifacts" / "MLmodel")
    v2 = dst.get_model_version("demo-classifier", "2")
    assert v2.source == f"models:/{model.model_id}"
    assert dst.get_registered_model("demo-classifier").aliases == {"baseline": 1, "champion": 2}


@pytest.fixture
def layout_2(tmp_path: Path) -> Path:
    """A copy of the kept export that a test may damage."""
    return Path(shutil.copytree(LAYOUT_2 / "export", tmp_path / "export"))


def _a_run(export: Path, with_files: bool = False) -> Path:
    return next(
        p.parent
        for p in sorted(export.glob("experiments/*/runs/*/run.json"))
        if not with_files or (p.parent / "artifacts").is_dir()
    )


def test_what_an_export_holds_but_is_not_carried_is_reported(layout_2: Path, new_sqlite: str) -> None:
    """Layout 2 can hold MLflow's GenAI objects too: each kind left out is named."""
    exp = next(layout_2.glob("experiments/*/experiment.json"))
    doc = json.loads(exp.read_text())
    doc["mlflow"]["traces"] = ["tr-1", "tr-2"]
    exp.write_text(json.dumps(doc))
    (layout_2 / "prompts" / "greeting_v1").mkdir(parents=True)
    (layout_2 / "prompts" / "greeting_v1" / "prompt.json").write_text("{}")
    p = run_cli("migrate", f"mlflow-export-import://{layout_2}", new_sqlite)
    name = doc["mlflow"]["experiment"]["name"]
    assert f"not-carried experiment '{name}': 2 trace(s) left out" in p.stdout, p.stdout
    assert "not-carried prompts: 1 left out" in p.stdout, p.stdout


def test_a_damaged_run_fails_alone(layout_2: Path, new_sqlite: str) -> None:
    bad = _a_run(layout_2)
    (bad / "run.json").write_text('{"mlflow": {"info": ')
    p = run_cli("migrate", f"mlflow-export-import://{layout_2}", new_sqlite, check=1)
    assert "runs: 5 new, 0 updated, 0 unchanged, 1 failed" in p.stdout, p.stdout
    assert f"{bad / 'run.json'}: cannot be read as JSON" in p.stdout + p.stderr


def test_json_of_another_shape_is_one_line_naming_its_file(layout_2: Path, new_sqlite: str) -> None:
    """A run whose history is not a list of points fails alone; an experiment file of
    another shape stops the read before anything is written."""
    bad = _a_run(layout_2, with_files=True)
    doc = json.loads((bad / "run.json").read_text())
    key = next(iter(doc["mlflow"]["metrics"]))
    doc["mlflow"]["metrics"][key] = [{"value": 1.0}]  # no timestamp
    (bad / "run.json").write_text(json.dumps(doc))
    timeless = next(r for r in sorted(layout_2.glob("experiments/*/runs/*")) if r != bad) / "run.json"
    doc = json.loads(timeless.read_text())
    doc["mlflow"]["info"]["start_time"] = None
    timeless.write_text(json.dumps(doc))
    p = run_cli("migrate", f"mlflow-export-import://{layout_2}", new_sqlite, check=1)
    assert "2 failed" in p.stdout and f"{bad / 'run.json'}: not as mlflow-export-import writes it" in p.stdout
    assert f"{timeless}: not as mlflow-export-import writes it (ValueError: start_time None" in p.stdout
    exp = bad.parent.parent / "experiment.json"
    exp.write_text(json.dumps({"mlflow": ["not", "an", "object"]}))
    p = run_cli("migrate", f"mlflow-export-import://{layout_2}", new_sqlite, check=3)
    assert f"{exp.parent}: not as mlflow-export-import writes it" in one_line(p.stderr)


def test_a_link_in_an_export_fails_its_run_and_nothing_is_read_through_it(
    layout_2: Path, new_sqlite: str, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any export")
    run = _a_run(layout_2, with_files=True)
    (run / "artifacts" / "notes.txt").unlink()
    (run / "artifacts" / "notes.txt").symlink_to(secret)
    p = run_cli("migrate", f"mlflow-export-import://{layout_2}", new_sqlite, check=1)
    assert "1 failed" in p.stdout and "is a link" in p.stdout + p.stderr, p.stdout
    assert run.name not in _runs(new_sqlite.removeprefix("mlflow+"))


@pytest.mark.parametrize(
    ("name", "path"),
    [("weights", "../../../../secret.txt"), ("../../../..", "secret.txt"), ("weights", "/etc/hostname")],
    ids=["file-climbs-out", "artifact-name-climbs-out", "absolute-file"],
)
def test_a_kept_artifacts_paths_from_a_runs_files_are_checked_before_any_is_read(
    layout_2: Path, tmp_path: Path, name: str, path: str
) -> None:
    """What trackbridge kept of a source artifact is named in the run's own extras.json,
    which an export folder makes untrusted: a path out of the run's files is refused
    before anything is opened, so no file of this machine can ride along."""
    from trackbridge.errors import BadInputError
    from trackbridge.exporters.mlflow.export_import import ExportImportSource

    (tmp_path / "secret.txt").write_text("not part of any export")
    source = ExportImportSource(str(layout_2))
    run = _a_run(layout_2, with_files=True)
    kept = {
        "row": {"name": name, "version": "v0", "type": "dataset"},
        "files": [{"path": path, "size": 22, "sha256": "0" * 64, "uri": None}],
    }
    with pytest.raises(BadInputError, match="escapes its folder"):
        source._source_artifact(source._run_repo(source.client.get_run(run.name)), kept)


def test_a_run_id_that_is_not_a_plain_name_is_refused(layout_2: Path, new_sqlite: str) -> None:
    exp = next(layout_2.glob("experiments/*/experiment.json"))
    doc = json.loads(exp.read_text())
    doc["mlflow"]["runs"].append("../../../../etc")
    exp.write_text(json.dumps(doc))
    p = run_cli("migrate", f"mlflow-export-import://{layout_2}", new_sqlite, check=3)
    assert "run '../../../../etc' is not a plain id" in one_line(p.stderr)


def test_a_folder_that_is_no_export_is_one_line_naming_what_it_holds(tmp_path: Path, new_sqlite: str) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hello")
    (tmp_path / "x" / "runs").mkdir()
    p = run_cli("migrate", f"mlflow-export-import://{tmp_path / 'x'}", new_sqlite, check=3)
    line = one_line(p.stderr)
    assert "not an mlflow-export-import folder" in line and "found: notes.txt, runs/" in line, line


def test_one_runs_export_is_one_line_saying_what_to_export_instead(layout_2: Path, new_sqlite: str) -> None:
    p = run_cli("migrate", f"mlflow-export-import://{_a_run(layout_2)}", new_sqlite, check=3)
    assert "one run's export (export-run) names no experiment" in one_line(p.stderr)


def test_an_export_folder_is_never_a_destination(exported: dict, tmp_path: Path) -> None:
    p = run_cli("migrate", exported["uri"], f"mlflow-export-import://{tmp_path}", check=2)
    assert "is a source only" in one_line(p.stderr)
    assert not list(tmp_path.iterdir())
