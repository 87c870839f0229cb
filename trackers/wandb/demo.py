"""A small but awkward set of W&B offline runs, written by the real wandb SDK.

``quickstart`` migrates it into MLflow, and the tests read it, so it holds what tends to
get lost: nested config with exact types, NaN, labels, notes, group and job type,
explicit summary values, images, histograms and tables, a model artifact with aliases,
a failed run and a run resumed in a second offline segment.

The SDK runs in a child process whose every W&B directory (and HOME) points into the
demo folder, so nothing lands in the user's home and no network is touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trackbridge.errors import MissingExtraError, TrackbridgeError
from trackbridge.trackers.wandb import common as wc

PROJECT = "demo-research"


def make_wandb_demo(root: str | os.PathLike[str], steps: int = 40) -> Path:
    """Write the demo runs under ``root``; return the folder to pass as wandb+offline://."""
    return _sdk(Path(root), "demo", steps)


def make_wandb_search(root: str | os.PathLike[str], trials: int = 6, sweep: str | None = None) -> Path:
    """A small hyperparameter search as W&B users log one: trials with a summary metric
    set only at the end, ``define_metric(summary="min")``, images and histograms at
    steps 0, 100 and 200, a table, tags, a group and (in the first trial) system
    metrics. What ``docs/native.md``'s screenshots and the native-landing tests show.

    With ``sweep`` (a sweep id), each trial runs in its own process as ``wandb agent``
    starts it (see ``make_wandb_sweep``), so the trials are the sweep's."""
    root = Path(root)
    if sweep is None:
        return _sdk(root, "search", trials)
    for i in range(trials):
        lr, batch = _search_params(i)
        extra = {"TRACKBRIDGE_DEMO_TRIALS": str(trials)}
        _agent_trial(root, sweep, "search", i, {"lr": lr, "batch_size": batch}, "search-trial", extra)
    return root / "wandb"


def make_wandb_sweep(root: str | os.PathLike[str], sweep_id: str, lrs: list[float]) -> Path:
    """Trials of a W&B sweep as ``wandb agent`` starts them offline (``_agent_trial``);
    the sweep's definition lives on the server."""
    root = Path(root)
    for i, lr in enumerate(lrs):
        _agent_trial(root, sweep_id, "sweeps", i, {"lr": lr, "layers": 2 + i % 2}, "sweep-trial")
    return root / "wandb"


def _agent_trial(
    root: Path,
    sweep: str,
    project: str,
    i: int,
    chosen: dict[str, Any],
    what: str,
    extra: dict[str, str] | None = None,
) -> None:
    """One trial in its own process with the environment ``wandb agent`` sets: the sweep
    id, the run id the controller chose, and the file of the parameters it chose,
    ``wandb/sweep-<id>/config-<run id>.yaml`` in W&B's config-file form."""
    run_id = f"{sweep[:4]}t{i:03d}"
    params = root / "wandb" / f"sweep-{sweep}" / f"config-{run_id}.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    lines = ["wandb_version: 1"] + [f"{k}:\n  value: {v!r}" for k, v in chosen.items()]
    params.write_text("\n".join(lines) + "\n")
    agent = {
        "WANDB_SWEEP_ID": sweep,
        "WANDB_RUN_ID": run_id,
        "WANDB_SWEEP_PARAM_PATH": str(params),
        "WANDB_PROJECT": project,
        **(extra or {}),
    }
    _sdk(root, what, i, agent)


def _sweep_trial() -> None:
    import wandb

    run = wandb.init(config={"epochs": 3}, settings=wandb.Settings(mode="offline", console="off"))
    lr = run.config["lr"]
    for step in range(3):
        run.log({"train/loss": 1.0 / (1 + step * lr * 10), "val/loss": 1.2 / (1 + step * lr * 10)}, step=step)
    run.summary["best_val_acc"] = round(0.7 + lr, 4)
    run.finish()


def _sdk(root: Path, what: str, n: int, extra_env: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **wc.sandbox_env(root),
        "HOME": str(root / "home"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        **(extra_env or {}),
    }
    p = subprocess.run(
        [sys.executable, "-m", "trackbridge.trackers.wandb.demo", what, str(root), str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if p.returncode != 0:
        if "No module named 'wandb'" in p.stderr:
            raise MissingExtraError("wandb", "wandb")
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise TrackbridgeError(f"the wandb SDK could not write the demo runs: {last}")
    return root / "wandb"


def _write(root: Path, steps: int) -> dict[str, Any]:
    import math

    import numpy as np
    import wandb

    def settings() -> Any:
        # a fresh object per run: wandb.init stores tags and notes in the one it is given
        return wandb.Settings(mode="offline", x_disable_stats=True, console="off", save_code=False)

    model = root / "model.bin"
    model.write_bytes(bytes(range(256)) * 64)

    run = wandb.init(
        project=PROJECT,
        name="baseline",
        config={
            "lr": 0.001,
            "epochs": steps,
            "optimizer": {"name": "adam", "betas": [0.9, 0.999]},
            "amp": True,
        },
        tags=["baseline", "resnet"],
        notes="First baseline of the demo sweep",
        group="sweep-1",
        job_type="train",
        settings=settings(),
    )
    for s in range(steps):
        loss = 1.0 / (s + 1)
        run.log({"train/loss": loss, "train/acc": 1 - loss, "lr": 0.001 * 0.95**s}, step=s)
    run.log({"train/loss": math.nan}, step=steps)  # a diverged step: NaN must survive
    rng = np.random.default_rng(3)
    run.log(
        {
            "samples": wandb.Image(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), caption="batch 0"),
            "weights": wandb.Histogram(rng.normal(size=200)),
            "predictions": wandb.Table(columns=["id", "label"], data=[[1, "cat"], [2, "dog"]]),
            "status": "converged",
        },
        step=steps + 1,
    )
    run.summary["best_acc"] = 0.975
    art = wandb.Artifact(
        "demo-classifier", type="model", description="ResNet weights", metadata={"arch": "r18"}
    )
    art.add_file(str(model), name="weights/model.bin")
    run.log_artifact(art, aliases=["candidate", "production"])
    run.finish()

    # a config bigger than one 32 KiB block: its record is split across blocks in the log
    big = {"lr": 0.5, "vocab": [f"token{i}" for i in range(6000)]}
    failed = wandb.init(project=PROJECT, name="diverged", config=big, job_type="train", settings=settings())
    for s in range(5):
        failed.log({"train/loss": 10.0 * (s + 1)}, step=s)
    failed.finish(exit_code=1)

    # One run in two offline segments, as after a preempted job resumed with the same id.
    for part in range(2):
        r = wandb.init(project=PROJECT, id="resumed01", name="resumed", resume="allow", settings=settings())
        for s in range(part * 10, part * 10 + 10):
            r.log({"val/loss": 0.5 / (s + 1)}, step=s)
        r.finish()
    return {"project": PROJECT}


def _search_params(i: int) -> tuple[float, int]:
    return 0.1 / 2**i, 32 * (1 + i % 2)


def _search(trials: int) -> None:
    for i in range(trials):
        _search_trial(i, trials)


def _search_trial(i: int, trials: int) -> None:
    import time

    import numpy as np
    import wandb

    lr, batch = _search_params(i)
    run = wandb.init(
        project="search",
        name=f"trial-{i}",
        config={"lr": lr, "batch_size": batch, "optimizer": {"name": "adam"}},
        tags=["baseline", "resnet"] if i % 2 == 0 else ["resnet"],
        group="lr-search",
        job_type="train",
        settings=wandb.Settings(
            mode="offline",
            console="off",
            save_code=False,
            x_disable_stats=i > 0,
            x_stats_sampling_interval=0.2,
        ),
    )
    run.define_metric("val/loss", summary="min")
    rng = np.random.default_rng(i)
    for step in range(0, 201, 10):
        decay = np.exp(-step * lr / 20)
        data = {"train/loss": float(decay + rng.normal(0, 0.02)), "val/loss": float(decay * 1.1 + 0.02)}
        if step % 100 == 0:
            data["samples"] = wandb.Image(
                rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), caption=f"step {step}"
            )
            data["weights"] = wandb.Histogram(rng.normal(0, 1 + step / 200, size=500))
        run.log(data, step=step)
    run.log(
        {
            "predictions": wandb.Table(
                columns=["id", "label", "score"],
                data=[[k, "cat" if k % 2 else "dog", round(0.5 + k / 20, 2)] for k in range(6)],
            )
        },
        step=201,
    )
    run.summary["best_val_acc"] = round(0.80 + 0.03 * i - 0.004 * i * i, 4)
    run.summary["status_note"] = "converged" if i < trials - 1 else "stopped early"
    if i == 0:
        time.sleep(1.5)  # a few samples of the system monitor
    run.finish()


if __name__ == "__main__":
    if sys.argv[1] == "search":
        _search(int(sys.argv[3]))
    elif sys.argv[1] == "search-trial":
        _search_trial(int(sys.argv[3]), int(os.environ["TRACKBRIDGE_DEMO_TRIALS"]))
    elif sys.argv[1] == "sweep-trial":
        _sweep_trial()
    else:
        _write(Path(sys.argv[2]), int(sys.argv[3]))
