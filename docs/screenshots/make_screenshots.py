"""Screenshots of a W&B sweep migrated into MLflow, as an MLflow user sees it.

    python docs/screenshots/make_screenshots.py [OUT_FOLDER]

Writes six trials of a W&B sweep with the real wandb SDK (offline, each started as
``wandb agent`` starts a trial), migrates them with
``trackbridge migrate`` into a real ``mlflow server`` on 127.0.0.1, and photographs
MLflow's own web UI with headless Chromium (Debian's ``chromium`` package): the runs
table sorted by a W&B summary metric, the sweep's parent run with its trials nested, a W&B model
artifact in the runs table's Models column, a run's metrics with its image card, a W&B table
in MLflow's table view, and W&B's system metrics in MLflow's System metrics tab.
Everything lives in a temporary folder; the server and the browser are stopped by
their PIDs. Not part of CI: it needs Chromium and takes about two minutes.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEP = "k3x9q2lp"
# MLflow's runs table shows a few columns and a "Show more columns" button: open it and
# tick the columns a W&B user would look at first, as a user would
SHOW_COLUMNS = """
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  for (const el of document.querySelectorAll('button')) {
    if (/Show more columns/.test(el.textContent || '')) { el.click(); break; }
  }
  await sleep(1500);
  for (const name of ['best_val_acc', 'val/loss.min', 'lr', 'status_note', 'label.baseline']) {
    for (const el of document.querySelectorAll('label, span, div')) {
      if (el.children.length === 0 && (el.textContent || '').trim() === name) { el.click(); break; }
    }
    await sleep(400);
  }
  document.activeElement && document.activeElement.blur();
  document.body.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
  await sleep(500);
})()
"""


# the runs table nests a parent's runs under it when sorted by time: open the sweep's
EXPAND_PARENT = """
for (const b of document.querySelectorAll('[data-component-id$="runnamecellrenderer.tsx_46"]')) b.click();
"""


class Browser:
    """Headless Chromium driven over the DevTools protocol (websocket-client, which the
    ``neptune`` extra installs): load a page, let MLflow's single-page app fetch its
    data, close the Assistant panel it opens on a first visit, then photograph it."""

    def __init__(self, chromium: str, profile: Path) -> None:
        import websocket

        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = profile / "DevToolsActivePort"
            for _ in range(300):
                if port_file.exists() and port_file.read_text().strip():
                    break
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            self.ws = websocket.create_connection(
                page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True
            )
        except BaseException:
            self._stop()  # never leave a browser running behind a failed start
            raise
        self.n = 0

    def call(self, method: str, **params: object) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, code: str) -> object:
        got = self.call("Runtime.evaluate", expression=code, returnByValue=True, awaitPromise=True)
        return got.get("result", {}).get("value")

    def shoot(
        self,
        url: str,
        out: Path,
        width: int = 1800,
        height: int = 1100,
        settle: float = 6,
        then: str | None = None,
    ) -> None:
        """``then``: JavaScript run once the page has settled (a click), before the photo."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.call("Page.navigate", url=url)
        time.sleep(settle)
        # the Assistant panel opens itself on a first visit to a local server: close it
        self.js(
            "for (const b of document.querySelectorAll('[data-assistant-ui] button')) {"
            "  const l = (b.getAttribute('aria-label') || '') + (b.dataset.componentId || '');"
            "  if (/close/i.test(l)) b.click(); }"
        )
        time.sleep(2)
        if then:
            self.js(then)
            time.sleep(3)
        shot = self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        print(f"  {out}")

    def close(self) -> None:
        self.ws.close()
        self._stop()

    def _stop(self) -> None:
        from trackbridge.trackers.mlflow.server import stop_group

        stop_group(self.proc)


def find_chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    return chromium


def sandboxed(root: Path) -> None:
    """Nothing lands in the real home or /tmp (Chromium's profile folders, MLflow's
    database locks): set before MLflow, matplotlib or W&B is imported."""
    (root / "tmp").mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(root / "tmp")
    tempfile.tempdir = None  # read TMPDIR again
    os.environ["HOME"] = str(root / "home")
    os.environ["MPLCONFIGDIR"] = str(root / "matplotlib")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


@contextmanager
def photo_session(out: Path) -> Iterator[tuple[Path, Path, Browser]]:
    """What every screenshot script needs: its output folder, a sandboxed work folder
    (removed after) and a headless browser (stopped by its PID after)."""
    chromium = find_chromium()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trackbridge-shots-") as tmp:
        root = Path(tmp)
        sandboxed(root)
        browser = Browser(chromium, root / "chromium")
        try:
            yield out, root, browser
        finally:
            browser.close()


def main(out: Path) -> None:
    with photo_session(out) as (out, root, browser):
        from mlflow import MlflowClient
        from trackbridge.trackers.mlflow.server import LocalMlflowServer
        from trackbridge.trackers.wandb.demo import make_wandb_demo, make_wandb_search

        print("writing six trials of a W&B sweep with the wandb SDK (offline)")
        runs = make_wandb_search(root / "wandb", trials=6, sweep=SWEEP)
        print("writing the W&B demo runs, one logging a model artifact")
        demo = make_wandb_demo(root / "demo")
        with LocalMlflowServer(root / "server") as url:
            print(f"migrating into mlflow server {url}")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "trackbridge.cli",
                    "migrate",
                    f"wandb+offline://{runs}",
                    f"mlflow+{url}",
                ],
                check=True,
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "trackbridge.cli",
                    "migrate",
                    f"wandb+offline://{demo}",
                    f"mlflow+{url}",
                    "--register-models",
                ],
                check=True,
            )
            client = MlflowClient(url)
            exp = client.get_experiment_by_name("search").experiment_id
            demo_exp = client.get_experiment_by_name("demo-research").experiment_id
            best = client.search_runs([exp], order_by=["metrics.best_val_acc DESC"])[0]
            run_id = best.info.run_id
            table = json.loads(best.data.tags["mlflow.loggedArtifacts"])[0]["path"]
            order = urllib.parse.urlencode({"orderByKey": "metrics.`best_val_acc`", "orderByAsc": "false"})
            by_time = urllib.parse.urlencode({"orderByKey": "attributes.start_time", "orderByAsc": "false"})
            print("photographing MLflow's UI")
            browser.shoot(
                f"{url}/#/experiments/{exp}/runs?{order}",
                out / "runs-table.png",
                width=2000,
                then=SHOW_COLUMNS,
            )
            browser.shoot(
                f"{url}/#/experiments/{exp}/runs?{by_time}",
                out / "sweep-nested.png",
                width=1600,
                height=600,
                then=EXPAND_PARENT,
            )
            browser.shoot(
                f"{url}/#/experiments/{demo_exp}/runs?{by_time}",
                out / "models-column.png",
                width=1600,
                height=500,
            )
            browser.shoot(
                f"{url}/#/experiments/{exp}/runs/{run_id}/model-metrics",
                out / "run-metrics.png",
                height=1700,
                settle=10,
            )
            browser.shoot(
                f"{url}/#/experiments/{exp}/runs/{run_id}/artifacts/{urllib.parse.quote(table)}",
                out / "table-view.png",
            )
            # the first trial ran with W&B's system monitor on
            (first,) = client.search_runs([exp], filter_string="attributes.run_name = 'trial-0'")
            browser.shoot(
                f"{url}/#/experiments/{exp}/runs/{first.info.run_id}/system-metrics",
                out / "system-metrics.png",
                height=1000,
                settle=10,
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
