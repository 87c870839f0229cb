"""An mlflow-export-import folder restored into MLflow, as an MLflow user sees it.

    python docs/screenshots/make_export_import_screenshot.py [OUT_FOLDER]

Migrates the export kept in tests/fixtures/mlflow-export-import-2/ (written by the real
tool) with ``trackbridge migrate mlflow-export-import://…`` into a real ``mlflow
server`` on 127.0.0.1, and photographs MLflow's own UI with headless Chromium: the
experiment's runs table, whose "Created" column holds the runs' original times (the
tool's own import would show the time of the import), nested runs under their parent.
Everything lives in a temporary folder; the server and the browser are stopped by
their PIDs. Not part of CI: it needs Chromium.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPORT = HERE.parents[1] / "tests" / "fixtures" / "mlflow-export-import-2" / "export"
sys.path.insert(0, str(HERE))


def main(out: Path) -> None:
    from make_screenshots import EXPAND_PARENT, photo_session

    with photo_session(out) as (out, root, browser):
        from mlflow import MlflowClient
        from trackbridge.trackers.mlflow.server import LocalMlflowServer

        with LocalMlflowServer(root / "server") as url:
            cmd = [sys.executable, "-m", "trackbridge.cli", "migrate", f"mlflow-export-import://{EXPORT}"]
            subprocess.run([*cmd, f"mlflow+{url}"], check=True)
            exp = MlflowClient(url).get_experiment_by_name("demo-classifier").experiment_id
            # the trials open under their sweep
            browser.shoot(
                f"{url}/#/experiments/{exp}/runs",
                out / "export-import-runs.png",
                height=700,
                then=EXPAND_PARENT,
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
