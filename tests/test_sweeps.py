"""W&B sweeps land in MLflow as MLflow's idiom for a search (issue 16): one parent run
named after the sweep, holding its definition as params and as ``sweep.yaml``, with the
sweep's best run named on it and every trial nested under it (``mlflow.parentRunId``).
Judged with ``MlflowClient``; a second import adds no second parent, and the parent is
recognised on the way back to W&B, so the round trip verifies identical.

Offline trials are written as ``wandb agent`` starts them (its environment: sweep id,
run id, the chosen parameters' file); the definition and best run come from the online
API, faked with the SDK's own ``public.Sweep`` and ``public.Run`` objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wandb")

import yaml
from trackbridge import engine
from trackbridge.exporters.mlflow.source import MlflowSource
from trackbridge.exporters.wandb.online import WandbOnlineSource
from trackbridge.importers.mlflow.sink import MlflowSink
from trackbridge.model import Selection
from trackbridge.trackers.wandb.api import sweep_info
from trackbridge.uri import open_source
from trackbridge.verify import verify
from wandb.apis import public

from tests.conftest import run_cli
from tests.test_wandb_online import FakeApi

SWEEP = "ab12cd34"
DEFINITION = {
    "method": "bayes",
    "metric": {"name": "loss", "goal": "minimize"},
    "parameters": {"lr": {"min": 0.001, "max": 0.1}, "opt": {"values": ["sgd", "adam"]}},
    "program": "train.py",
}


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trackbridge.trackers.wandb.demo import make_wandb_sweep

    return make_wandb_sweep(tmp_path_factory.mktemp("sweep"), SWEEP, [0.1, 0.03, 0.01])


@pytest.fixture(scope="module")
def landed(trials: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import mlflow

    out = tmp_path_factory.mktemp("landed")
    db = out / "m.db"
    p = run_cli("migrate", f"wandb+offline://{trials}", f"mlflow+sqlite:///{db}")
    assert "verify: identical (1 projects, 4 runs" in p.stdout, p.stdout
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("sweeps").experiment_id
    return {"db": db, "client": client, "exp": exp}


def test_offline_trials_are_nested_under_one_parent_named_after_the_sweep(landed: dict) -> None:
    client = landed["client"]
    runs = client.search_runs([landed["exp"]])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in parents] == [SWEEP]
    pid = parents[0].info.run_id
    nested = client.search_runs([landed["exp"]], filter_string=f"tags.mlflow.parentRunId = '{pid}'")
    assert sorted(r.data.params["lr"] for r in nested) == ["0.01", "0.03", "0.1"]
    assert all(r.data.params["epochs"] == "3" for r in nested)  # the trial's own config too
    # the trials' own data is where it always was
    assert all(len(client.get_metric_history(r.info.run_id, "val/loss")) == 3 for r in nested)


def test_the_search_row_is_the_same_whichever_trials_a_filter_picks(trials: Path) -> None:
    src = open_source(f"wandb+offline://{trials}")
    every = src.runs(Selection(), src.projects(Selection()))
    (search,) = [r for r in every if r.get("sweep_key") == r["run_key"]]
    latest = max((r for r in every if r is not search), key=lambda r: r["start_time"])
    one = Selection(runs=(latest["source_id"],))
    fresh = open_source(f"wandb+offline://{trials}")  # nothing listed before
    picked = fresh.runs(one, fresh.projects(one))
    assert [r["run_key"] for r in picked] == [search["run_key"], latest["run_key"]]
    assert picked[0] == search and search["start_time"] < latest["start_time"]  # the first trial's


def test_a_second_import_adds_no_second_parent(landed: dict, trials: Path, tmp_path: Path) -> None:
    run_cli(
        "migrate",
        f"wandb+offline://{trials}",
        f"mlflow+sqlite:///{landed['db']}",
        "--report",
        str(tmp_path / "r.json"),
    )
    outcomes = [r["outcome"] for r in json.loads((tmp_path / "r.json").read_text())["runs"]]
    assert outcomes == ["unchanged"] * 4
    runs = landed["client"].search_runs([landed["exp"]])
    assert len(runs) == 4 and sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 1


def test_the_parent_is_recognised_on_the_way_back_to_wandb(
    landed: dict, trials: Path, tmp_path: Path
) -> None:
    back = tmp_path / "back"
    p = run_cli(
        "migrate", f"mlflow+sqlite:///{landed['db']}", f"wandb+offline://{back}", "--experiment", "sweeps"
    )
    assert "verify: identical (1 projects, 4 runs" in p.stdout, p.stdout
    sel = Selection()
    b = open_source(f"wandb+offline://{back}")
    rows = b.runs(sel, b.projects(sel))
    # three W&B runs, no fourth one for the search: it is kept with each trial
    logs = sorted(back.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 3
    read = [b.read_run(r) for r in rows]
    (search,) = [x for x in read if x.run["sweep_key"] == x.key]
    trials_back = [x for x in read if x.key != search.key]
    assert {x.run["sweep_key"] for x in trials_back} == {search.key} and search.run["name"] == SWEEP
    from trackbridge.exporters.wandb.builder import RunBuilder

    config = RunBuilder("x")
    config.read(logs[0])
    assert config.run.run_group == SWEEP  # a W&B user sees the trials together
    # the originals and the copies back hold the same trials
    a = open_source(f"wandb+offline://{trials}")
    orig = {
        json.dumps(sorted((tuple(p["path"]), p["value_json"]) for p in x.params.to_pylist()))
        for x in (a.read_run(r) for r in a.runs(sel, a.projects(sel)))
    }
    again = {
        json.dumps(sorted((tuple(p["path"]), p["value_json"]) for p in x.params.to_pylist())) for x in read
    }
    assert orig == again


class SweepApi(FakeApi):
    """Both runs are trials of one sweep the server defines, run001 its best."""

    def __init__(self) -> None:
        super().__init__()
        for r in (self.run, self.crashed):
            r._attrs["sweepName"] = "swp1"
        self.asked: list[str] = []

    def sweep(self, entity: str, project: str, sweep_id: str) -> Any:
        self.asked.append(sweep_id)
        attrs = {
            "config": yaml.safe_dump(DEFINITION),
            "state": "FINISHED",
            "createdAt": "2026-05-01T09:00:00",
            "displayName": "lr-search",
        }
        return sweep_info(public.Sweep(None, entity, project, sweep_id, attrs=attrs), self.run)


def test_an_online_sweep_brings_its_definition_and_best_run(tmp_path: Path) -> None:
    api = SweepApi()
    src = WandbOnlineSource("acme/vision", api=api)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    sel = Selection(registry=False)
    report = engine.copy(src, MlflowSink(uri), sel)
    assert [r.outcome for r in report.runs] == ["new"] * 3, [r.error for r in report.runs]
    assert api.asked == ["swp1"]  # once per sweep, not per trial
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("vision").experiment_id
    (parent,) = client.search_runs([exp], filter_string="attributes.run_name = 'lr-search'")
    p = parent.data.params
    assert (p["method"], p["metric.name"], p["metric.goal"]) == ("bayes", "loss", "minimize")
    assert (p["parameters.lr.min"], p["parameters.opt.values"]) == ("0.001", '["sgd","adam"]')
    assert parent.info.status == "FINISHED" and parent.info.start_time == 1777626000000
    # the best run, named on the parent and its value searchable
    assert (
        parent.data.tags["best_run_name"] == "online-baseline" and parent.data.tags["best_run_id"] == "run001"
    )
    assert parent.data.metrics["best_loss"] == 0.1
    assert (
        client.search_runs([exp], filter_string="metrics.best_loss < 0.2")[0].info.run_id
        == parent.info.run_id
    )
    local = client.download_artifacts(parent.info.run_id, "sweep.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(local).read_text()) == DEFINITION  # `wandb sweep sweep.yaml` takes it again
    kids = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in kids) == ["online-baseline", "oom"]

    diffs, stats = verify(src, MlflowSource(uri), sel)
    assert diffs == [] and stats["runs"] == 3
    again = engine.copy(src, MlflowSink(uri), sel)
    assert [r.outcome for r in again.runs] == ["unchanged"] * 3
    # and back out: the search with its definition, its file and tags taken out again
    out = MlflowSource(uri)
    rows = out.runs(sel, out.projects(sel))
    (search,) = [out.read_run(r) for r in rows if r["name"] == "lr-search"]
    assert search.run["sweep_key"] == search.key
    files = [f.path for a in search.artifacts for f in a.files]
    assert "sweep.yaml" not in files and "best_run_name" not in search.tags.column("key").to_pylist()
    assert {tuple(x["path"]) for x in search.summary.to_pylist()} == {
        ("best_run_id",),
        ("best_run_name",),
        ("best_loss",),
    }
    tree = {tuple(x["path"]): json.loads(x["value_json"]) for x in search.params.to_pylist()}
    assert tree[("parameters", "opt", "values")] == ["sgd", "adam"]

    # into W&B, where only the sweep controller makes sweeps: the search rides with its
    # trials and reads back whole
    from trackbridge.exporters.wandb.offline import WandbOfflineSource
    from trackbridge.importers.wandb.offline import WandbOfflineSink

    sel = Selection(registry=False, projects=("vision",))
    engine.copy(MlflowSource(uri), WandbOfflineSink(str(tmp_path / "back")), sel)
    back = WandbOfflineSource(str(tmp_path / "back"))
    diffs, stats = verify(MlflowSource(uri), back, sel)
    # (offline W&B cannot take the model's s3:// reference file: reported, not a sweep matter)
    assert [d for d in diffs if "ref.txt" not in d] == [] and stats["runs"] == 3
    (kept,) = [
        back.read_run(r) for r in back.runs(sel, back.projects(sel)) if r.get("sweep_key") == r["run_key"]
    ]
    assert {tuple(x["path"]): json.loads(x["value_json"]) for x in kept.params.to_pylist()} == tree
