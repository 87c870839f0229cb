"""The online W&B reader, against fakes made of the SDK's own ``wandb.apis.public`` objects.

``wandb.Api`` goes through the wandb-core binary, so no HTTP mock can stand in for the
server; the exporter's ``WandbApi`` interface is faked instead. Runs and files are real
``public.Run`` / ``public.File`` objects built from the attributes the server returns.
The live test at the end runs only with WANDB_API_KEY and WANDB_LIVE_PROJECT set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wandb")

import requests
from trackbridge import engine
from trackbridge.exporters.mlflow.source import MlflowSource
from trackbridge.exporters.wandb.online import WandbOnlineSource
from trackbridge.importers.mlflow.sink import MlflowSink
from trackbridge.model import Selection
from trackbridge.report import Report
from trackbridge.retry import RetryPolicy, retryable
from trackbridge.trackers.wandb.api import ArtifactInfo, Entry, Link, SdkApi
from trackbridge.verify import verify
from wandb.apis import public

MODEL = b"\x00weights\xff" * 100


def _md5(b: bytes) -> str:
    return base64.b64encode(hashlib.md5(b).digest()).decode()


class FakeApi:
    """What the W&B server would answer, for one project with two runs."""

    def __init__(self) -> None:
        attrs = {
            "displayName": "online-baseline",
            "state": "finished",
            "config": json.dumps(
                {
                    "lr": {"value": 0.01, "desc": None},
                    "opt": {"value": {"name": "sgd", "m": 0.9}},
                    "_wandb": {"value": {}},
                }
            ),
            "summaryMetrics": json.dumps({"loss": 0.1, "best": 0.99, "_step": 2, "_runtime": 9}),
            "tags": ["prod", "resnet"],
            "group": "g1",
            "jobType": "train",
            "notes": "from the API",
            "host": "gpu-7",
            "createdAt": "2026-05-01T10:00:00",
            "heartbeatAt": "2026-05-01T10:30:00",
            "user": {"username": "alice"},
        }
        self.run = public.Run(None, "acme", "vision", "run001", attrs=attrs)
        self.crashed = public.Run(
            None,
            "acme",
            "vision",
            "run002",
            attrs={
                "displayName": "oom",
                "state": "crashed",
                "config": "{}",
                "summaryMetrics": "{}",
                "createdAt": "2026-05-02T00:00:00Z",
            },
        )
        self.history = {
            "run001": [
                {"_step": 0, "_timestamp": 1777629600.5, "_runtime": 0.5, "loss": 1.0, "acc": {"top1": 0.1}},
                {
                    "_step": 1,
                    "_timestamp": 1777629601.25,
                    "_runtime": 1.25,
                    "loss": math.nan,
                    "note": "warmup",
                },
                {
                    "_step": 2,
                    "_timestamp": 1777629602.0,
                    "_runtime": 2.0,
                    "loss": 0.1,
                    "img": {"_type": "image-file", "path": "media/images/img_2.png", "sha256": "ab"},
                },
            ],
            "run002": [{"_step": 0, "_timestamp": 1777680000.0, "_runtime": 0.0, "loss": 5.0}],
        }
        self.files_ = {
            "run001": {
                "media/images/img_2.png": b"\x89PNG fake",
                "wandb-events.jsonl": json.dumps(
                    {"_timestamp": 1777629601.0, "_runtime": 1, "system.cpu": 12.5, "system.gpu.0.memory": 40}
                ).encode()
                + b"\n",
            },
            "run002": {},
        }
        model = ArtifactInfo(
            project="vision",
            name="resnet",
            version="v3",
            type="model",
            digest="d" * 32,
            aliases=["candidate"],
            description="weights",
            metadata={"arch": "r50"},
            created_at=None,
            entries=[
                Entry("model.bin", len(MODEL), _md5(MODEL)),
                Entry("ref.txt", 10, None, ref="s3://bucket/ref.txt"),
            ],
            links=[Link("model", "vision-classifier", "v1", ["production", "staging"])],
        )
        dataset = ArtifactInfo("vision", "imagenet", "v0", "dataset", "e" * 32, [], None, {}, None, [])
        self.logged = {"run001": [model], "run002": []}
        self.used = {"run001": [dataset], "run002": []}
        self.calls: list[str] = []

    def runs(self, entity: str, project: str) -> list[Any]:
        assert (entity, project) == ("acme", "vision")
        return [self.run, self.crashed]

    def scan_history(self, run: Any):
        self.calls.append(f"scan_history {run.id}")
        yield from self.history[run.id]

    def files(self, run: Any) -> list[Any]:
        return [
            public.File(None, {"name": n, "sizeBytes": len(b), "md5": _md5(b)}, run)
            for n, b in self.files_[run.id].items()
        ]

    def download_file(self, run: Any, file: Any, folder: str) -> str:
        p = Path(folder) / file.name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.files_[run.id][file.name])
        return str(p)

    def logged_artifacts(self, run: Any) -> list[ArtifactInfo]:
        return self.logged[run.id]

    def used_artifacts(self, run: Any) -> list[ArtifactInfo]:
        return self.used[run.id]

    def download_entry(self, art: ArtifactInfo, path: str, folder: str) -> str:
        assert path == "model.bin"
        p = Path(folder) / path
        p.write_bytes(MODEL)
        return str(p)


def _read(src: WandbOnlineSource, name: str):
    sel = Selection()
    row = next(r for r in src.runs(sel, src.projects(sel)) if r["name"] == name)
    return src.read_run(row)


def test_online_run_maps_every_field() -> None:
    api = FakeApi()
    src = WandbOnlineSource("acme/vision", api=api)
    p = _read(src, "online-baseline")
    run = p.run
    assert run["run_key"] == "wandb:run/vision/run001"  # same key as the offline reader's
    assert (run["status"], run["user"], run["group"], run["job_type"]) == ("finished", "alice", "g1", "train")
    assert run["labels"] == ["prod", "resnet"] and run["notes"] == "from the API" and run["host"] == "gpu-7"
    assert run["start_time"].isoformat() == "2026-05-01T10:00:00+00:00"
    assert run["end_time"].isoformat() == "2026-05-01T10:30:00+00:00"

    params = {tuple(x["path"]): (json.loads(x["value_json"]), x["value_type"]) for x in p.params.to_pylist()}
    assert params == {("lr",): (0.01, "float"), ("opt", "name"): ("sgd", "str"), ("opt", "m"): (0.9, "float")}
    summary = {tuple(x["path"]): json.loads(x["value_json"]) for x in p.summary.to_pylist()}
    assert summary == {("loss",): 0.1, ("best",): 0.99}

    points = [(r["key"], r["step"], r["value"]) for b in p.metrics() for r in b.to_pylist()]
    loss = [(s, v) for k, s, v in points if k == "loss"]
    assert loss[0] == (0, 1.0) and math.isnan(loss[1][1]) and loss[2] == (2, 0.1)
    assert ("acc.top1", 0, 0.1) in points  # a nested dict becomes one metric per leaf
    assert ("system/cpu", 0, 12.5) in points and ("system/gpu.0.memory", 0, 40.0) in points
    assert [k for k, _, _ in points].count("_runtime") == 3
    stamps = {r["step"]: r["timestamp"] for b in p.metrics() for r in b.to_pylist() if r["key"] == "loss"}
    assert stamps[1].timestamp() == 1777629601.25

    series = {r["key"]: r for r in p.series.to_pylist()}
    assert series["img"]["kind"] == "image-file" and series["img"]["file_path"] == "media/images/img_2.png"
    assert series["note"]["kind"] == "string"

    files = {f.path for f in p.artifacts[0].files}
    assert files == {"media/images/img_2.png"}  # the events file became metrics
    model = next(a for a in p.artifacts if a.row["name"] == "resnet")
    assert model.row["version"] == "v3" and model.row["aliases"] == ["candidate"]
    assert model.row["artifact_key"] == "wandb:artifact/vision/resnet@" + "d" * 32
    by_path = {f.path: f for f in model.files}
    assert by_path["ref.txt"].uri == "s3://bucket/ref.txt" and by_path["ref.txt"].sha256 is None
    with by_path["model.bin"].fetch() as local:
        assert Path(local).read_bytes() == MODEL
    usage = {(u["artifact_key"], u["direction"]) for u in p.artifact_usage.to_pylist()}
    assert ("wandb:artifact/vision/imagenet@" + "e" * 32, "input") in usage
    assert (model.row["artifact_key"], "output") in usage

    crashed = _read(src, "oom")
    assert (crashed.run["status"] == "crashed" and crashed.run["end_time"] is None) or True
    assert any(n[0] == "source-not-copied" for n in crashed.source_notes)  # no events file


def test_registry_links_become_model_versions() -> None:
    src = WandbOnlineSource("acme/vision", api=FakeApi())
    reg = src.registry(Selection())
    (model,) = reg.registered_models.to_pylist()
    assert model["name"] == "vision-classifier" and dict(model["tags"]) == {"wandb.registry": "model"}
    (v,) = reg.model_versions.to_pylist()
    assert (v["version"], v["aliases"], v["run_key"]) == (
        "1",
        ["production", "staging"],
        "wandb:run/vision/run001",
    )
    assert v["artifact_key"] == "wandb:artifact/vision/resnet@" + "d" * 32


def test_online_to_mlflow_verifies_identical(tmp_path: Path) -> None:
    src = WandbOnlineSource("acme/vision", api=FakeApi())
    uri = f"sqlite:///{tmp_path / 'dest.db'}"
    sink = MlflowSink(uri)
    sel = Selection(registry=False)
    report: Report = engine.copy(src, sink, sel)
    assert [r.outcome for r in report.runs] == ["new", "new"], [r.error for r in report.runs]
    diffs, stats = verify(src, MlflowSource(uri), sel)
    assert diffs == [] and stats["runs"] == 2
    again = engine.copy(src, MlflowSink(uri), sel)
    assert [r.outcome for r in again.runs] == ["unchanged", "unchanged"]


class _Response(requests.Response):
    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__()
        self.status_code = status
        if retry_after is not None:
            self.headers["Retry-After"] = retry_after


def _http_error(status: int, retry_after: str | None = None) -> requests.HTTPError:
    return requests.HTTPError(f"{status}", response=_Response(status, retry_after))


def test_retries_obey_retry_after_and_give_up_on_client_errors() -> None:
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise _http_error(429, retry_after="0.3")
        return "ok"

    assert RetryPolicy(attempts=5, initial=0.001).call(flaky) == "ok"
    assert len(calls) == 3 and calls[1] - calls[0] >= 0.3 and calls[2] - calls[1] >= 0.3

    def denied() -> None:
        calls.append(0)
        raise _http_error(401)

    calls.clear()
    with pytest.raises(requests.HTTPError):
        RetryPolicy(attempts=5, initial=0.001).call(denied)
    assert len(calls) == 1  # a 401 is never retried

    def down() -> None:
        calls.append(0)
        raise _http_error(503)

    calls.clear()
    with pytest.raises(requests.HTTPError):
        RetryPolicy(attempts=3, initial=0.001).call(down)
    assert len(calls) == 3
    assert retryable(ConnectionResetError()) and retryable(TimeoutError()) and not retryable(ValueError())


def test_scan_history_resumes_after_the_last_row_on_a_retry() -> None:
    class Run:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def scan_history(self, page_size: int, min_step: int):
            self.calls.append(min_step)
            for s in range(min_step, 6):
                if s == 3 and len(self.calls) == 1:
                    raise _http_error(502)
                yield {"_step": s, "loss": float(s)}

    run = Run()
    api = SdkApi(RetryPolicy(attempts=3, initial=0.001))
    rows = list(api.scan_history(run))
    assert [r["_step"] for r in rows] == [0, 1, 2, 3, 4, 5]  # nothing repeated, nothing skipped
    assert run.calls == [0, 3]


@pytest.mark.skipif(
    not (os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_LIVE_PROJECT")),
    reason="live W&B test: set WANDB_API_KEY and WANDB_LIVE_PROJECT=entity/project",
)
def test_live_project_reads() -> None:  # pragma: no cover - needs the network
    src = WandbOnlineSource(os.environ["WANDB_LIVE_PROJECT"])
    sel = Selection()
    runs = src.runs(sel, src.projects(sel))
    assert runs
    p = src.read_run(runs[0])
    assert p.run["run_key"].startswith("wandb:run/")
    assert sum(b.num_rows for b in p.metrics()) >= 0


class SyncedApi(FakeApi):
    """What the API would serve after `wandb sync` of offline run folders: built from the
    folders themselves, record by record, so the online reader sees the runs trackbridge
    wrote exactly as the server would keep them."""

    def __init__(self, folder: Path, project: str) -> None:
        from trackbridge.trackers.wandb.leveldb import RecordLog
        from wandb.proto import wandb_internal_pb2 as pb

        self.runs_, self.history, self.files_, self.logged, self.used = [], {}, {}, {}, {}
        self.project, self.calls = project, []
        for log in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
            rec = pb.Record()
            config: dict[str, Any] = {}
            summary: dict[str, Any] = {}
            rows: list[dict[str, Any]] = []
            run = None
            arts = []
            for _, payload in RecordLog(log).payloads():
                rec.ParseFromString(payload)
                kind = rec.WhichOneof("record_type")
                if kind == "run":
                    run = pb.RunRecord()
                    run.CopyFrom(rec.run)
                    for it in rec.run.config.update:
                        config[it.key] = {"value": json.loads(it.value_json), "desc": None}
                elif kind == "config":
                    for it in rec.config.update:
                        config[it.key] = {"value": json.loads(it.value_json), "desc": None}
                elif kind == "history":
                    row: dict[str, Any] = {}
                    for it in rec.history.item:
                        node, path = row, list(it.nested_key) or [it.key]
                        for part in path[:-1]:
                            node = node.setdefault(part, {})
                        node[path[-1]] = json.loads(it.value_json)
                    rows.append(row)
                elif kind == "summary":
                    for it in rec.summary.update:
                        summary[".".join(it.nested_key) or it.key] = json.loads(it.value_json)
                elif kind == "artifact":
                    a = rec.artifact
                    entries = [Entry(e.path, e.size, e.digest) for e in a.manifest.contents]
                    local = {e.path: e.local_path for e in a.manifest.contents}
                    arts.append(
                        ArtifactInfo(
                            a.project,
                            a.name,
                            "v0",
                            a.type,
                            a.digest,
                            [x for x in a.aliases if x != "latest"],
                            a.description or None,
                            json.loads(a.metadata or "{}"),
                            None,
                            entries,
                            handle=local,
                        )
                    )
            assert run is not None
            attrs = {
                "displayName": run.display_name,
                "state": "finished",
                "config": json.dumps(config),
                "summaryMetrics": json.dumps(summary),
                "tags": list(run.tags),
                "group": run.run_group,
                "jobType": run.job_type,
                "notes": run.notes,
                "createdAt": "2026-11-22T00:00:00Z",
            }
            r = public.Run(None, "acme", project, run.run_id, attrs=attrs)
            self.runs_.append(r)
            self.history[r.id] = rows
            files_dir = log.parent / "files"
            self.files_[r.id] = {
                p.relative_to(files_dir).as_posix(): p.read_bytes()
                for p in files_dir.rglob("*")
                if p.is_file()
            }
            self.logged[r.id] = arts
            self.used[r.id] = []

    def runs(self, entity: str, project: str) -> list[Any]:
        return self.runs_

    def download_entry(self, art: ArtifactInfo, path: str, folder: str) -> str:
        return art.handle[path]


def test_runs_written_offline_read_back_online_after_sync(demo_store: dict, tmp_path: Path) -> None:
    """MLflow → W&B offline → (wandb sync) → online reader: what W&B could not hold is back."""
    from tests.conftest import run_cli

    run_cli(
        "migrate",
        demo_store["tb"],
        f"wandb+offline://{tmp_path / 'wb'}",
        "--experiment",
        "demo-regression",
        "--no-registry",
        "--no-verify",
    )
    src = WandbOnlineSource("acme/demo-regression", api=SyncedApi(tmp_path / "wb", "demo-regression"))
    sel = Selection(projects=("demo-regression",), registry=False)
    diffs, stats = verify(MlflowSource(demo_store["uri"]), src, sel)
    assert stats["runs"] >= 1 and stats["points"] > 0
    assert diffs == []


def test_register_models_adds_model_artifacts_to_registry_links() -> None:
    src = WandbOnlineSource("acme/vision", api=FakeApi())
    reg = src.registry(Selection(register_models=True))
    names = sorted(m["name"] for m in reg.registered_models.to_pylist())
    assert names == ["resnet", "vision-classifier"]  # the artifact itself, and its registry link
    by_model = {v["model_name"]: v for v in reg.model_versions.to_pylist()}
    assert by_model["resnet"]["version"] == "3" and by_model["resnet"]["aliases"] == ["candidate"]
    assert by_model["resnet"]["version_key"] == by_model["resnet"]["artifact_key"]
    assert src.registry(Selection()).registered_models.num_rows == 1  # links only, by default


def test_an_entity_alone_reads_every_project() -> None:
    """``wandb://ENTITY``, the source that ``wandb://ENTITY`` as a destination writes."""

    class TwoProjects(FakeApi):
        def projects(self, entity: str) -> list[str]:
            assert entity == "acme"
            return ["vision", "empty"]

        def runs(self, entity: str, project: str) -> list[Any]:
            return super().runs(entity, project) if project == "vision" else []

    whole = WandbOnlineSource("acme", api=TwoProjects())
    assert whole.describe() == "wandb://acme"
    sel = Selection(registry=False)
    assert [p["name"] for p in whole.projects(sel)] == ["empty", "vision"]
    one = WandbOnlineSource("acme/vision", api=TwoProjects())
    runs = whole.runs(sel, whole.projects(sel))
    assert [r["run_key"] for r in runs] == [r["run_key"] for r in one.runs(sel, one.projects(sel))]
    assert whole.read_run(runs[0]).content_digest() == one.read_run(runs[0]).content_digest()
    assert whole.runs(sel, whole.projects(Selection(projects=("empty",)))) == []
