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
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPORT = HERE.parents[1] / "tests" / "fixtures" / "mlflow-export-import-2" / "export"
sys.path.insert(0, str(HERE))
# open the nested runs under their parent: the row's expander, the first button in it
EXPAND_SWEEP = """[...document.querySelectorAll('[role=row]')]
  .find(r => r.innerText.includes('sweep'))?.querySelector('button')?.click()"""


def main(out: Path) -> None:
    from make_screenshots import Browser, find_chromium, sandboxed

    chromium = find_chromium()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trackbridge-shots-") as tmp:
        root = Path(tmp)
        sandboxed(root)
        from mlflow import MlflowClient
        from trackbridge.trackers.mlflow.server import LocalMlflowServer

        with LocalMlflowServer(root / "server") as url:
            cmd = [sys.executable, "-m", "trackbridge.cli", "migrate", f"mlflow-export-import://{EXPORT}"]
            subprocess.run([*cmd, f"mlflow+{url}"], check=True)
            exp = MlflowClient(url).get_experiment_by_name("demo-classifier").experiment_id
            browser = Browser(chromium, root / "chromium")
            try:
                browser.shoot(
                    f"{url}/#/experiments/{exp}/runs",
                    out / "export-import-runs.png",
                    height=700,
                    then=EXPAND_SWEEP,
                )
            finally:
                browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
