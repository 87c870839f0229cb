"""Writing to W&B online (``wandb://ENTITY[/PROJECT]``), with the server stood in for.

The online importer asks W&B four things through ``WandbWriteApi``: open a run (the real
one calls ``wandb.init`` online), what a run id already holds, where an artifact is, and
to link one into the Registry. No server is reachable here, so ``OfflineServer`` answers
them from the SDK's own offline folders: ``init`` opens the same SDK run offline (the
records wandb-core would stream are the ones it writes), and the answers are read back
from those records with the SDK's record classes. What the importer wrote is then read
back with our own ``.wandb`` reader and verified against the MLflow source.
The live test at the end runs only with WANDB_API_KEY and WANDB_LIVE_ENTITY set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wandb")

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from trackbridge import engine
from trackbridge.errors import UsageError
from trackbridge.exporters.mlflow.source import MlflowSource
from trackbridge.exporters.wandb.offline import WandbOfflineSource
from trackbridge.importers.wandb.online import WandbOnlineSink, WrittenRun
from trackbridge.model import Selection
from trackbridge.trackers.wandb import common as wc
from trackbridge.trackers.wandb.leveldb import RecordLog
from trackbridge.uri import open_sink
from trackbridge.verify import verify


class OfflineServer:
    """A W&B server as far as the online importer can see it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.inits: list[dict[str, Any]] = []
        self.links: list[tuple[str, str, list[str]]] = []

    def ready(self) -> None:
        pass

    def _logs(self) -> list[tuple[Path, list[Any]]]:
        from wandb.proto import wandb_internal_pb2 as pb

        out = []
        for log in sorted(self.folder.glob("wandb/offline-run-*/run-*.wandb")):
            recs = []
            for _, payload in RecordLog(log).payloads():
                rec = pb.Record()
                rec.ParseFromString(payload)
                recs.append(rec)
            out.append((log, recs))
        return out

    def init(self, entity: str, **kwargs: Any) -> Any:
        import wandb

        self.inits.append({"entity": entity, **kwargs})
        assert Path(kwargs.pop("dir")).is_dir()  # the SDK's local copy goes to a scratch folder
        settings = wandb.Settings(mode="offline", **kwargs.pop("settings"))
        return wandb.init(dir=str(self.folder), settings=settings, **kwargs)

    def find_run(self, entity: str, project: str, run_id: str) -> WrittenRun | None:
        config: dict[str, Any] = {}
        last, found = -1, False
        for _, recs in self._logs():  # segments in the order they were written
            head = next((r.run for r in recs if r.WhichOneof("record_type") == "run"), None)
            if head is None:  # a run another worker is writing right now: not flushed yet
                continue
            if (head.run_id, head.project) != (run_id, project):
                continue
            found = True
            for rec in recs:
                kind = rec.WhichOneof("record_type")
                if kind in ("run", "config"):
                    for it in (rec.run.config if kind == "run" else rec.config).update:
                        config[it.key or it.nested_key[0]] = json.loads(it.value_json)
                elif kind == "history":
                    last = max(last, rec.history.step.num)
        return WrittenRun(config.get(wc.META_KEY), last) if found else None

    def find_artifact(self, entity: str, project: str, name: str, kind: str, artifact_key: str) -> str | None:
        digests: list[str] = []
        for _, recs in self._logs():
            for rec in recs:
                a = rec.artifact
                if rec.WhichOneof("record_type") != "artifact" or (a.name, a.type, a.project) != (
                    name,
                    kind,
                    project,
                ):
                    continue
                if a.digest not in digests:
                    digests.append(a.digest)
                if json.loads(a.metadata)[wc.META_KEY]["row"]["artifact_key"] == artifact_key:
                    return f"{entity}/{project}/{name}:v{digests.index(a.digest)}"
        return None

    def link(self, artifact_path: str, target_path: str, aliases: list[str]) -> None:
        self.links.append((artifact_path, target_path, aliases))


def _files(tmp_path: Path) -> str:
    """Where a source store made here with MLflow's plain client keeps its experiment's
    files: the test's folder (the client alone would use ./mlruns of the checkout)."""
    return (tmp_path / "src-artifacts").as_uri()


def _copy(store: str, server: OfflineServer, sel: Selection, uri: str = "acme/research"):
    return engine.copy(MlflowSource(store), WandbOnlineSink(uri, api=server), sel)


def test_mlflow_to_wandb_online_verifies_and_is_not_written_twice(demo_store: dict, tmp_path: Path) -> None:
    """``wandb://acme``: each source project becomes the W&B project of its name."""
    server = OfflineServer(tmp_path / "server")
    sel = Selection(projects=("demo-classifier", "demo-regression"), registry=False)
    report = _copy(demo_store["uri"], server, sel, uri="acme")
    assert [r.outcome for r in report.runs] == ["new"] * 6, [r.error for r in report.runs]
    assert {i["project"] for i in server.inits} == {"demo-classifier", "demo-regression"}
    assert all("resume" not in i for i in server.inits)
    diffs, stats = verify(MlflowSource(demo_store["uri"]), WandbOfflineSource(str(server.folder)), sel)
    assert stats["runs"] == 6 and stats["points"] == 310
    assert diffs == []

    again = _copy(demo_store["uri"], server, sel, uri="acme")
    assert [r.outcome for r in again.runs] == ["unchanged"] * 6
    assert len(server.inits) == 6  # nothing opened


def test_a_named_project_holds_every_source_project_and_says_so(demo_store: dict, tmp_path: Path) -> None:
    server = OfflineServer(tmp_path / "server")
    sel = Selection(projects=("demo-classifier", "demo-regression"), registry=False)
    report = _copy(demo_store["uri"], server, sel)  # wandb://acme/research
    assert [r.outcome for r in report.runs] == ["new"] * 6
    assert {i["project"] for i in server.inits} == {"research"}
    merged = [m for r in report.runs for m in r.mappings if m.kind == "project-merged"]
    assert len(merged) == 6 and any(
        "'demo-regression' written into W&B project 'research'" in m.detail for m in merged
    )


def test_a_run_that_grew_is_resumed_and_only_the_new_rows_appended(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'src.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("nightly", artifact_location=_files(tmp_path))
    rid = client.create_run(exp, start_time=1_700_000_000_000, run_name="long-job").info.run_id
    client.log_batch(
        rid, metrics=[Metric("loss", 1.0 / (s + 1), 1_700_000_000_000 + s, s) for s in range(50)]
    )
    server = OfflineServer(tmp_path / "server")
    sel = Selection(projects=("nightly",), registry=False)
    assert [r.outcome for r in _copy(uri, server, sel).runs] == ["new"]

    client.log_batch(
        rid, metrics=[Metric("loss", 1.0 / (s + 1), 1_700_000_000_000 + s, s) for s in range(50, 80)]
    )
    client.set_terminated(rid, "FINISHED", end_time=1_700_000_100_000)
    grown = _copy(uri, server, sel)
    assert [r.outcome for r in grown.runs] == ["updated"]
    assert grown.runs[0].points == 30  # only the rows after W&B's last step
    assert server.inits[-1]["resume"] == "allow" and server.inits[-1]["id"] == server.inits[0]["id"]
    assert any(m.kind == "resumed" for m in grown.runs[0].mappings)
    diffs, stats = verify(MlflowSource(uri), WandbOfflineSource(str(server.folder)), sel)
    assert diffs == [] and stats["points"] == 80
    assert [r.outcome for r in _copy(uri, server, sel).runs] == ["unchanged"]


def test_a_half_written_run_is_completed_not_duplicated(tmp_path: Path) -> None:
    """An import killed before its fingerprint: the next one appends what is missing."""
    uri = f"sqlite:///{tmp_path / 'src.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("crashy", artifact_location=_files(tmp_path))
    rid = client.create_run(exp, start_time=1_700_000_000_000).info.run_id
    client.log_batch(rid, metrics=[Metric("acc", s / 100, 1_700_000_000_000 + s, s) for s in range(40)])
    client.set_terminated(rid, "FINISHED")
    server = OfflineServer(tmp_path / "server")
    sel = Selection(projects=("crashy",), registry=False)

    class Killed(Exception):
        pass

    class Crashing(OfflineServer):
        def init(self, entity: str, **kwargs: Any) -> Any:
            run = super().init(entity, **kwargs)
            real_log = run.log

            def log(data: dict[str, Any], step: int) -> None:
                if step == 25:
                    raise Killed
                real_log(data, step=step)

            run.log = log
            return run

    first = _copy(uri, Crashing(server.folder), sel)
    assert first.runs[0].error and "Killed" in first.runs[0].error
    written = server.find_run("acme", "research", first.runs[0].destination_id)
    assert written is not None and written.last_step == 24 and "fingerprint" not in (written.meta or {})

    second = _copy(uri, server, sel)
    assert [r.outcome for r in second.runs] == ["updated"] and second.runs[0].points == 15
    diffs, stats = verify(MlflowSource(uri), WandbOfflineSource(str(server.folder)), sel)
    assert diffs == [] and stats["points"] == 40


def test_history_changed_under_a_written_run_is_refused_not_doubled(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'src.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("edited", artifact_location=_files(tmp_path))
    rid = client.create_run(exp, start_time=1_700_000_000_000).info.run_id
    client.log_batch(rid, metrics=[Metric("loss", 1.0, 1_700_000_000_000 + s, s) for s in range(10)])
    server = OfflineServer(tmp_path / "server")
    sel = Selection(projects=("edited",), registry=False)
    _copy(uri, server, sel)
    client.log_batch(rid, metrics=[Metric("extra", 5.0, 1_700_000_000_003, 3)])  # into row 3
    again = _copy(uri, server, sel)
    assert again.runs[0].error and "cannot rewrite a run's history" in again.runs[0].error
    assert len(server.inits) == 1  # the run was not opened again


def test_registry_versions_are_linked_with_aliases_and_stage(tmp_path: Path) -> None:
    import warnings

    from trackbridge.trackers.mlflow import common as mc

    uri = f"sqlite:///{tmp_path / 'src.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("vision", artifact_location=_files(tmp_path))
    rid = client.create_run(exp, start_time=1_700_000_000_000, run_name="train").info.run_id
    client.log_batch(rid, metrics=[Metric("loss", 0.5, 1_700_000_000_000, 0)])
    lm = client.create_logged_model(exp, name="resnet", source_run_id=rid)
    (tmp_path / "MLmodel").write_text("artifact_path: model\nflavors: {}\n")
    client.log_model_artifact(lm.model_id, str(tmp_path / "MLmodel"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "w.bin").write_bytes(b"\x01" * 100)
    client.log_artifacts(rid, str(tmp_path / "files"), "model")
    client.set_terminated(rid, "FINISHED")
    client.create_registered_model("classifier", description="the classifier", tags={"team": "cv"})
    with mc.global_tracking_uri(uri):
        v1 = client.create_model_version(
            "classifier", f"models:/{lm.model_id}", run_id=rid, model_id=lm.model_id
        )
    art = client.get_run(rid).info.artifact_uri
    client.create_model_version("classifier", f"{art}/model", run_id=rid, description="run files")
    client.set_registered_model_alias("classifier", "champion", v1.version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage("classifier", v1.version, "Production")

    server = OfflineServer(tmp_path / "server")
    sel = Selection(projects=("vision",))
    report = _copy(uri, server, sel, uri="acme")
    assert not report.errors and not [r.error for r in report.runs if r.error], report.errors
    assert server.links == [
        ("acme/vision/resnet:v0", "wandb-registry-model/classifier", ["champion", "production"])
    ]
    kinds = {m.kind for m in report.other_mappings}
    assert {"registry-not-linked", "registry-model-fields", "registry-version-numbers"} <= kinds
    assert report.models["linked"] == 1 and "1 linked into the W&B Registry" in report.summary_lines()[2]

    again = _copy(uri, server, sel, uri="acme")  # runs unchanged: the link is found all the same
    assert [r.outcome for r in again.runs] == ["unchanged"] and server.links[-1] == server.links[0]


def test_no_credentials_is_one_line_before_any_run(demo_store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import run_cli

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    p = run_cli("migrate", demo_store["tb"], "wandb://acme", check=2)
    assert p.stderr.strip().startswith("trackbridge: error: W&B: No API key configured")
    assert "Traceback" not in p.stderr and "FAILED" not in p.stdout


def test_bad_destination_uri_is_one_line() -> None:
    with pytest.raises(UsageError, match="expected wandb://ENTITY"):
        open_sink("wandb://")


@pytest.mark.skipif(
    not (os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_LIVE_ENTITY")),
    reason="live W&B test: set WANDB_API_KEY and WANDB_LIVE_ENTITY",
)
def test_live_write_then_read(demo_store: dict) -> None:  # pragma: no cover - needs the network
    from trackbridge.exporters.wandb.online import WandbOnlineSource

    target = f"{os.environ['WANDB_LIVE_ENTITY']}/trackbridge-live-write"
    sel = Selection(projects=("demo-regression",), registry=False)
    report = engine.copy(MlflowSource(demo_store["uri"]), open_sink(f"wandb://{target}"), sel)
    assert not [r.error for r in report.runs if r.error]
    diffs, _ = verify(MlflowSource(demo_store["uri"]), WandbOnlineSource(target), sel)
    assert diffs == []


def test_sdk_write_api_asks_wandb_api_and_retries() -> None:
    """``SdkWriteApi`` over a stand-in for ``wandb.Api`` that serves the SDK's own objects."""
    import requests
    from trackbridge.importers.wandb.online import SdkWriteApi
    from trackbridge.retry import RetryPolicy
    from wandb.apis import public
    from wandb.apis.public.runs import RunNotFoundError

    class Resp(requests.Response):
        def __init__(self) -> None:
            super().__init__()
            self.status_code = 429
            self.headers["Retry-After"] = "0"

    class Run(public.Run):
        @property
        def lastHistoryStep(self) -> int:  # a GraphQL query in the SDK
            return 41

    class Art:
        def __init__(self, key: str, version: str) -> None:
            self.metadata = {wc.META_KEY: {"row": {"artifact_key": key}}}
            self.qualified_name = f"acme/vision/resnet:{version}"
            self.linked: list[tuple[str, list[str]]] = []

        def link(self, target: str, aliases: list[str]) -> None:
            self.linked.append((target, aliases))

    arts = [Art("mlflow:model/a", "v0"), Art("mlflow:model/b", "v1")]

    class Api:
        calls = 0

        def run(self, path: str) -> Any:
            Api.calls += 1
            if Api.calls == 1:
                raise requests.HTTPError("429", response=Resp())  # rate limited once
            if path.endswith("/gone"):
                raise RunNotFoundError(f"Could not find run {path}")
            meta = {"source_key": "k", "fingerprint": "f"}
            return Run(
                None,
                "acme",
                "vision",
                path.rsplit("/", 1)[1],
                attrs={"config": json.dumps({wc.META_KEY: {"value": meta}})},
            )

        def artifact_collection_exists(self, name: str, kind: str) -> bool:
            return name == "acme/vision/resnet" and kind == "model"

        def artifacts(self, kind: str, name: str, per_page: int) -> list[Art]:
            return arts

        def artifact(self, path: str) -> Art:
            return next(a for a in arts if a.qualified_name == path)

    api = SdkWriteApi(RetryPolicy(attempts=3, initial=0.01))
    api._api = Api()
    written = api.find_run("acme", "vision", "abc123")
    assert written == WrittenRun({"source_key": "k", "fingerprint": "f"}, 41)
    assert api.policy.obeyed == 1
    assert api.find_run("acme", "vision", "gone") is None
    assert api.find_artifact("acme", "vision", "resnet", "model", "mlflow:model/b") == "acme/vision/resnet:v1"
    assert api.find_artifact("acme", "vision", "resnet", "model", "mlflow:model/zz") is None
    assert api.find_artifact("acme", "vision", "other", "model", "mlflow:model/b") is None
    api.link("acme/vision/resnet:v1", "wandb-registry-model/classifier", ["champion"])
    assert arts[1].linked == [("wandb-registry-model/classifier", ["champion"])]
