"""A TensorBoard log folder migrated into MLflow, as an MLflow user sees it.

    python docs/screenshots/make_tensorboard_screenshot.py [OUT_FOLDER]

Writes the TensorBoard demo logs with PyTorch's ``SummaryWriter`` (scalars, a restart,
text, an image, a histogram, hparams), migrates them with ``trackbridge migrate
tensorboard://…`` into a real ``mlflow server`` on 127.0.0.1, and photographs MLflow's
own UI with headless Chromium: a run's metrics, with its image card and histogram.
Everything lives in a temporary folder; the server and the browser are stopped by
their PIDs. Not part of CI: it needs Chromium.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(out: Path) -> None:
    from make_screenshots import photo_session

    with photo_session(out) as (out, root, browser):
        from mlflow import MlflowClient
        from trackbridge.trackers.mlflow.server import LocalMlflowServer
        from trackbridge.trackers.tensorboard.demo import make_tensorboard_demo

        logs = make_tensorboard_demo(root / "tb-logs")
        with LocalMlflowServer(root / "server") as url:
            cmd = [sys.executable, "-m", "trackbridge.cli", "migrate", f"tensorboard://{logs}"]
            subprocess.run([*cmd, f"mlflow+{url}"], check=True)
            client = MlflowClient(url)
            exp = client.get_experiment_by_name("tb-logs").experiment_id
            (run,) = client.search_runs([exp], filter_string="attributes.run_name = 'train/a'")
            browser.shoot(
                f"{url}/#/experiments/{exp}/runs/{run.info.run_id}/model-metrics",
                out / "tensorboard-run.png",
                height=1500,
                settle=10,
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
