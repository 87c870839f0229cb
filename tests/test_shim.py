"""The dual-logging shim: every point reaches every destination, whatever happens to one.

Real destinations only: an MLflow SQLite store and server (one that a test stops
mid-run), a fault-injecting proxy in front of the server, W&B offline runs written by
the SDK, and a training process killed with SIGKILL. What a destination holds is read
back through trackbridge's own readers and compared with the spool field by field.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trackbridge
from trackbridge.model import Selection
from trackbridge.trackers.mlflow.server import LocalMlflowServer
from trackbridge.uri import open_source
from trackbridge.verify import verify

from tests.conftest import killable_env, run_cli
from tests.faultproxy import FAULTS, FaultProxy

pytest.importorskip("mlflow")
pytest.importorskip("wandb")

KEYS = [f"k{i}" for i in range(3)]  # CI time: the benchmark logs 10


def _row(step: int) -> dict[str, float]:
    return {k: step + i / 10 for i, k in enumerate(KEYS)}


def _same(spool: Path, dest: str) -> dict[str, int]:
    diffs, stats = verify(open_source(f"spool://{spool}"), open_source(dest), Selection(registry=False))
    assert diffs == [], diffs[:5]
    return stats


def test_every_point_of_a_20000_step_run_reaches_mlflow_and_wandb(tmp_path: Path) -> None:
    mlflow_uri = f"mlflow+sqlite:///{tmp_path / 'm.db'}"
    wandb_uri = f"wandb+offline://{tmp_path / 'wb'}"
    run = trackbridge.init(
        project="shim",
        name="long",
        config={"lr": 0.01, "model": {"depth": 4}},
        to=[mlflow_uri, wandb_uri],
        spool=tmp_path / "spool",
    )
    for step in range(20_000):
        run.log(_row(step))  # no step: numbered 0, 1, 2, … as wandb.log does
        if step % 5000 == 0:
            run.log({"note": f"at {step}"}, step=step)
    run.summary["best"] = 0.5
    (tmp_path / "model.pt").write_bytes(b"weights")
    run.log_artifact(tmp_path / "model.pt", name="net", type="model", aliases=["candidate"])
    assert run.finish() == {mlflow_uri: "complete", wandb_uri: "complete"}
    for dest in (mlflow_uri, wandb_uri):
        assert _same(tmp_path / "spool", dest)["points"] == 60_000
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (r,) = c.search_runs([c.get_experiment_by_name("shim").experiment_id])
    assert r.data.tags["trackbridge.source_key"] == f"wandb:run/shim/{run.id}"
    assert r.data.params["model.depth"] == "4" and r.info.status == "FINISHED"
    assert len(c.get_metric_history(r.info.run_id, "k2")) == 20_000
    folders = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run.id}"))
    assert len(folders) == 1  # the W&B run has the shim's own id


def test_a_server_stopped_mid_run_is_completed_from_the_spool(tmp_path: Path) -> None:
    server = LocalMlflowServer(tmp_path / "server")
    url = server.start()
    dest = f"mlflow+{url}"
    run = trackbridge.init(
        project="shim", name="outage", to=[dest], spool=tmp_path / "spool", flush_timeout=5
    )
    slowest = 0.0
    try:
        for step in range(3000):
            if step == 1000:
                time.sleep(0.5)  # let the live feed deliver some
                server.stop()
            t = time.perf_counter()
            run.log(_row(step), step=step)
            slowest = max(slowest, time.perf_counter() - t)
        outcome = run.finish()
    finally:
        server.stop()
    assert slowest < 0.05  # log() never waited for the dead server
    assert outcome[dest].startswith("behind")
    assert f"trackbridge sync spool://{tmp_path / 'spool'} {dest}" in outcome[dest]
    # the same store behind a new server: the replay completes it exactly
    again = LocalMlflowServer(tmp_path / "server")
    url2 = again.start()
    try:
        run_cli(
            "sync", f"spool://{tmp_path / 'spool'}", f"mlflow+{url2}", "--state-dir", str(tmp_path / "st")
        )
        assert _same(tmp_path / "spool", f"mlflow+{url2}")["points"] == 9_000
    finally:
        again.stop()


def test_a_flaky_server_behind_a_fault_proxy_ends_exact(mlflow_server: str, tmp_path: Path) -> None:
    with FaultProxy(mlflow_server, rate=0.2, seed=11) as proxy:
        dest = f"mlflow+{proxy.url}"
        run = trackbridge.init(project="shim-flaky", to=[dest], spool=tmp_path / "spool", flush_timeout=120)
        for step in range(2000):
            run.log(_row(step), step=step)
        outcome = run.finish()
        assert sum(proxy.counts[f] for f in FAULTS) > 0  # faults were injected, not just requests
    if outcome[dest] != "complete":  # the retries ran out: the replay finishes it
        run_cli(
            "sync",
            f"spool://{tmp_path / 'spool'}",
            f"mlflow+{mlflow_server}",
            "--state-dir",
            str(tmp_path / "s"),
        )
    assert _same(tmp_path / "spool", f"mlflow+{mlflow_server}")["points"] == 6_000


TRAIN = """
import sys, trackbridge
run = trackbridge.init(project="killed", name="k", to=[sys.argv[1]], spool=sys.argv[2], fsync="batch")
step = 0
while True:
    run.log({f"k{i}": step + i / 10 for i in range(10)}, step=step)
    step += 1
    if step % 200 == 0:
        assert run.flush_spool()  # what was logged is in the spool: acknowledged
        print(step, flush=True)
"""


def test_kill_9_of_training_then_replay_leaves_nothing_missing(tmp_path: Path) -> None:
    dest = f"mlflow+sqlite:///{tmp_path / 'm.db'}"
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(TRAIN), dest, str(tmp_path / "spool")],
        stdout=subprocess.PIPE,
        text=True,
        env=killable_env(tmp_path),
    )
    acked = 0
    assert p.stdout is not None
    for line in p.stdout:
        acked = int(line)
        if acked >= 3000:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    run_cli("sync", f"spool://{tmp_path / 'spool'}", dest, "--state-dir", str(tmp_path / "st"))
    stats = _same(tmp_path / "spool", dest)
    assert stats["points"] >= acked * 10  # every step acknowledged before the kill, at least
    src = open_source(f"spool://{tmp_path / 'spool'}")
    (row,) = src.runs(Selection(), src.projects(Selection()))
    payload = src.read_run(row)
    assert payload.run["status"] == "crashed"
    steps = sorted({s for b in payload.metrics() for s in b.column("step").to_pylist()})
    assert steps == list(range(len(steps)))  # no hole anywhere in what was spooled


def test_wandb_drop_in_mirrors_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trackbridge.wandb_compat as wandb

    mlflow_uri = f"mlflow+sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("TRACKBRIDGE_TO", f"{mlflow_uri},wandb+offline://{tmp_path / 'wb'}")
    monkeypatch.setenv("TRACKBRIDGE_SPOOL", str(tmp_path / "spool"))
    wandb.init(project="drop-in", name="w", config={"epochs": 2})
    wandb.config.batch = 32
    wandb.define_metric("val/acc", step_metric="epoch")
    for epoch in range(2):
        wandb.log({"epoch": np.int64(epoch), "val/acc": np.float64(0.5 + epoch / 10)})  # NumPy, as often
    wandb.summary["best"] = 0.6
    art = wandb.Artifact("weights", type="model")
    (tmp_path / "w.bin").write_bytes(b"w")
    art.add_file(str(tmp_path / "w.bin"))
    wandb.log_artifact(art, aliases=["candidate"])
    wandb.finish()
    _same(tmp_path / "spool", mlflow_uri)
    _same(tmp_path / "spool", f"wandb+offline://{tmp_path / 'wb'}")
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (r,) = c.search_runs([c.get_experiment_by_name("drop-in").experiment_id])
    assert r.data.params == {"epochs": "2", "batch": "32"}
    assert [m.value for m in c.get_metric_history(r.info.run_id, "val/acc")] == [0.5, 0.6]
    # a replay into another store can promote the logged model, alias and all
    fresh = f"mlflow+sqlite:///{tmp_path / 'reg.db'}"
    p = run_cli("migrate", f"spool://{tmp_path / 'spool'}", fresh, "--register-models")
    assert "verify: identical (1 projects, 1 runs, 4 points, 1 model versions)" in p.stdout, p.stdout
    reg = MlflowClient(f"sqlite:///{tmp_path / 'reg.db'}").get_registered_model("weights")
    assert {k: str(v) for k, v in reg.aliases.items()} == {"candidate": "1"}


def test_a_bad_destination_fails_in_the_callers_hands(tmp_path: Path) -> None:
    from trackbridge.errors import UsageError

    with pytest.raises(UsageError, match="unknown URI scheme"):
        trackbridge.init(project="p", to=["nosuch://x"], spool=tmp_path / "spool")


def test_spool_is_not_a_destination(tmp_path: Path) -> None:
    from trackbridge.errors import UsageError
    from trackbridge.uri import open_sink

    with pytest.raises(UsageError, match=r"written by trackbridge\.init"):
        open_sink(f"spool://{tmp_path}")


def test_hugging_face_callback_logs_what_the_trainer_logs(tmp_path: Path) -> None:
    import transformers  # a dev dependency: real TrainingArguments, TrainerState, TrainerControl
    from trackbridge.integrations import hf_callback

    dest = f"mlflow+sqlite:///{tmp_path / 'm.db'}"
    cb = hf_callback(to=[dest], spool=tmp_path / "spool")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), run_name="hf-run", report_to=[])
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb.on_train_begin(args, state, control)
    for step in range(1, 51):  # what Trainer does every logging_steps
        state.global_step = step
        cb.on_log(args, state, control, logs={"loss": 1 / step, "learning_rate": 1e-4, "epoch": step / 50})
    cb.on_train_end(args, state, control)
    _same(tmp_path / "spool", dest)
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (r,) = c.search_runs([c.get_experiment_by_name("out").experiment_id])
    assert r.info.run_name == "hf-run" and r.data.params["args.learning_rate"] == str(args.learning_rate)
    assert [m.step for m in c.get_metric_history(r.info.run_id, "loss")] == list(range(1, 51))


def test_lightning_logger_logs_a_real_fit(tmp_path: Path) -> None:
    """A real ``lightning.Trainer.fit`` on the CPU, logging through ``lightning_logger``."""
    import lightning as L  # a dev dependency, with the CPU build of torch
    import torch
    from trackbridge.integrations import lightning_logger

    class Tiny(L.LightningModule):
        def __init__(self, lr: float = 0.05, width: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()  # → the logger's log_hyperparams
            self.net = torch.nn.Linear(width, 1)

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    dest = f"mlflow+sqlite:///{tmp_path / 'm.db'}"
    logger = lightning_logger(project="lit", name="tiny", to=[dest], spool=tmp_path / "spool")
    trainer = L.Trainer(
        max_epochs=3,
        logger=logger,
        log_every_n_steps=1,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path / "out"),
    )
    trainer.fit(Tiny(), loader, loader)
    assert logger.experiment.finished
    _same(tmp_path / "spool", dest)
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (r,) = c.search_runs([c.get_experiment_by_name("lit").experiment_id])
    assert r.info.run_name == "tiny" and r.info.status == "FINISHED"
    assert r.data.params["lr"] == "0.05" and r.data.params["width"] == "4"
    steps = [m.step for m in c.get_metric_history(r.info.run_id, "train_loss")]
    assert steps == list(range(24))  # 8 batches × 3 epochs, each at its global step
    assert len(c.get_metric_history(r.info.run_id, "val_loss")) == 3


def test_a_run_that_ends_before_its_destination_starts_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    """A short script, or a destination slow to start (MLflow's import and a new SQLite
    store take seconds), that logged more than the backlog meanwhile: the destination's
    first write already sees the whole spool, and none of it came live."""
    from trackbridge.shim_backend import Backend

    real = Backend._start

    def late(self: Backend):  # starts only once finish() has closed the spool
        while not self._closing:
            time.sleep(0.01)
        return real(self)

    monkeypatch.setattr(Backend, "_start", late)
    dest = f"mlflow+sqlite:///{tmp_path / 'm.db'}"
    run = trackbridge.init(project="short", to=[dest], spool=tmp_path / "spool", backlog=500)
    for step in range(1000):
        run.log(_row(step))
    assert run.finish(quiet=True) == {dest: "complete"}
    assert _same(tmp_path / "spool", dest)["points"] == 3000
