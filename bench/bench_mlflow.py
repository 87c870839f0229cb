"""MLflow → MLflow: trackbridge against mlflow-export-import and the raw REST ceiling.

One command runs everything side by side on the same machine, in the same run:

    python bench/bench_mlflow.py                      # 20 runs x 10 metrics x 5,000 steps
    python bench/bench_mlflow.py --runs 2 --steps 500 --artifact-mb 1   # a quick smoke run

It starts loopback `mlflow server`s with SQLite backends (one source, and a fresh
destination for each contender), fills the source with the real MLflow client, then
times:

- export: `trackbridge export` vs `export-experiment` (mlflow-export-import) vs a tight
  loop of raw REST `get-history` reads plus artifact downloads, at trackbridge's
  parallelism; --repeat rounds (default 3), the three taking turns, medians compared;
- import: `trackbridge import` vs `import-experiment` vs raw `log-batch` calls of 1,000
  points plus artifact uploads, at the same parallelism;
- restore: `trackbridge migrate mlflow-export-import://FOLDER` vs `import-experiment`,
  both from the folder mlflow-export-import exported, each into a fresh server (its own
  import resets the start times; trackbridge keeps them);
- peak memory (max RSS of the process) of trackbridge export and import, 5 runs vs 20.

mlflow-export-import runs from its own virtualenv (bench/.work/mee-venv, made on first
use with `pip install mlflow-export-import==1.2.0 tabulate`), so it cannot change the
packages trackbridge is measured with. Results go to stdout and, with --json, a file.
This is a benchmark, not a test: it asserts nothing and CI does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trackbridge.trackers.mlflow.server import LocalMlflowServer

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
EXPERIMENT = "bench"
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
ENV = {
    **os.environ,
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "HOME": str(WORK / "home"),
}


# --------------------------------------------------------------------------- servers


def Server(name: str, workers: int) -> LocalMlflowServer:
    """A fresh server in bench/.work/NAME; `with` starts it and stops it by its PID."""
    root = WORK / name
    shutil.rmtree(root, ignore_errors=True)
    return LocalMlflowServer(root, workers=workers, env=ENV)


# --------------------------------------------------------------------------- helpers


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run a command; return (seconds, peak RSS in MiB) of that child alone (os.wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}… exited {proc.returncode}:\n{out.decode()[-3000:]}")
    return elapsed, usage.ru_maxrss // 1024


def populate(url: str, runs: int, metrics: int, steps: int, artifact_mb: int) -> list[dict]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(url)
    exp = client.create_experiment(EXPERIMENT)
    rng = random.Random(1)
    blob = WORK / "artifact.bin"
    blob.write_bytes(rng.randbytes(artifact_mb * 1024 * 1024))
    out = []
    t0 = 1_700_000_000_000

    def one(i: int) -> dict:
        r = client.create_run(exp, start_time=t0 + i * 60_000, run_name=f"run-{i}")
        rid = r.info.run_id
        client.log_batch(rid, params=[Param(f"p{j}", str(rng.random())) for j in range(20)])
        batch = []
        for k in range(metrics):
            for s in range(steps):
                batch.append(Metric(f"metric_{k}", rng.random(), t0 + s * 100, s))
                if len(batch) == 1000:
                    client.log_batch(rid, metrics=batch)
                    batch = []
        if batch:
            client.log_batch(rid, metrics=batch)
        client.log_artifact(rid, str(blob), "model")
        client.set_terminated(rid, "FINISHED", end_time=t0 + i * 60_000 + 30_000)
        return {"run_id": rid, "experiment_id": exp}

    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(one, range(runs)))
    return out


def raw_read(url: str, runs: list[dict], metrics: int, workers: int) -> int:
    """The ceiling for export: paged get-history for every metric, then every artifact."""
    keys = [f"metric_{k}" for k in range(metrics)]
    total = 0

    def history(job: tuple[str, str]) -> int:
        run_id, key = job
        s = requests.Session()
        n, token = 0, None
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                params["page_token"] = token
            body = s.get(f"{url}/api/2.0/mlflow/metrics/get-history", params=params, timeout=120).json()
            n += len(body.get("metrics", []))
            token = body.get("next_page_token")
            if not token:
                return n

    def artifact(r: dict) -> int:
        path = f"{r['experiment_id']}/{r['run_id']}/artifacts/model/artifact.bin"
        n = 0
        with requests.get(
            f"{url}/api/2.0/mlflow-artifacts/artifacts/{path}", stream=True, timeout=300
        ) as resp:
            resp.raise_for_status()
            for chunk in resp.iter_content(1 << 20):
                n += len(chunk)
        return n

    with ThreadPoolExecutor(workers) as ex:
        total = sum(ex.map(history, [(r["run_id"], k) for r in runs for k in keys]))
        sum(ex.map(artifact, runs))
    return total


def raw_write(url: str, payload: list[dict], blob: Path, workers: int) -> None:
    """The ceiling for import: create, log-batch 1,000 points at a time, upload, finish."""
    exp = requests.post(
        f"{url}/api/2.0/mlflow/experiments/create", json={"name": EXPERIMENT}, timeout=60
    ).json()["experiment_id"]

    def one(run: dict) -> None:
        s = requests.Session()
        r = s.post(
            f"{url}/api/2.0/mlflow/runs/create",
            timeout=60,
            json={"experiment_id": exp, "start_time": run["start_time"], "run_name": run["name"]},
        ).json()
        rid = r["run"]["info"]["run_id"]
        s.post(
            f"{url}/api/2.0/mlflow/runs/log-batch", json={"run_id": rid, "params": run["params"]}, timeout=60
        ).raise_for_status()
        for chunk in run["metric_batches"]:
            s.post(
                f"{url}/api/2.0/mlflow/runs/log-batch", json={"run_id": rid, "metrics": chunk}, timeout=120
            ).raise_for_status()
        with open(blob, "rb") as f:
            s.put(
                f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp}/{rid}/artifacts/model/artifact.bin",
                data=f,
                timeout=300,
            ).raise_for_status()
        s.post(
            f"{url}/api/2.0/mlflow/runs/update",
            timeout=60,
            json={"run_id": rid, "status": "FINISHED", "end_time": run["end_time"]},
        ).raise_for_status()

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, payload))


def raw_payload(bundle: Path) -> list[dict]:
    """The import ceiling's input, prepared outside the timer: the bundle's data as JSON."""
    from trackbridge.bundle_reader import BundleSource
    from trackbridge.model import Selection

    src = BundleSource(bundle)
    out = []
    for row in src.runs(Selection(), src.projects(Selection())):
        p = src.read_run(row)
        points = [
            {
                "key": m["key"],
                "value": m["value"],
                "timestamp": int(m["timestamp"].timestamp() * 1000),
                "step": m["step"],
            }
            for b in p.metrics()
            for m in b.to_pylist()
        ]
        out.append(
            {
                "name": row["name"],
                "start_time": int(row["start_time"].timestamp() * 1000),
                "end_time": int(row["end_time"].timestamp() * 1000),
                "params": [
                    {"key": x["path"][0], "value": json.loads(x["value_json"])} for x in p.params.to_pylist()
                ],
                "metric_batches": [points[i : i + 1000] for i in range(0, len(points), 1000)],
            }
        )
    return out


def ensure_mee() -> Path:
    venv = WORK / "mee-venv"
    exe = venv / "bin" / "export-experiment"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "mlflow-export-import==1.2.0", "tabulate"],
            check=True,
        )
    return venv / "bin"


def tb(*args: str) -> list[str]:
    return [sys.executable, "-m", "trackbridge.cli", *args]


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--small-runs", type=int, default=5, help="the smaller run count for the memory check")
    ap.add_argument("--metrics", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--artifact-mb", type=int, default=10)
    ap.add_argument(
        "--workers", type=int, default=4, help="trackbridge --workers, and the raw loops' threads"
    )
    ap.add_argument("--server-workers", type=int, default=2)
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="export rounds (trackbridge, mlflow-export-import, raw, in turn); medians are compared",
    )
    ap.add_argument("--no-import", action="store_true", help="measure the export side only")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    WORK.mkdir(exist_ok=True)
    (WORK / "home").mkdir(exist_ok=True)
    mee_bin = ensure_mee()
    points = args.runs * args.metrics * args.steps
    res: dict = {"config": vars(args) | {"json": str(args.json) if args.json else None, "points": points}}
    print(
        f"data: {args.runs} runs x {args.metrics} metrics x {args.steps} steps = {points:,} points, "
        f"{args.artifact_mb} MB artifact per run; workers {args.workers}",
        flush=True,
    )

    workers = ["--workers", str(args.workers)]

    def measure(key: str, label: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        res[f"{key}_s"], res[f"{key}_rss_mb"] = run_child(cmd, env)
        print(f"{label:<34} {res[f'{key}_s']:7.1f} s  peak {res[f'{key}_rss_mb']} MiB", flush=True)

    with Server("source", args.server_workers) as src_url:
        t = time.perf_counter()
        runs = populate(src_url, args.runs, args.metrics, args.steps, args.artifact_mb)
        print(f"populated the source in {time.perf_counter() - t:.1f} s", flush=True)
        src_uri = f"mlflow+{src_url}"

        # ---- export: the contenders take turns, round after round, so that a slow
        # stretch of the machine falls on all of them; medians are compared
        bundle, small, mee_dir = WORK / "bundle", WORK / "bundle-small", WORK / "mee-export"
        rounds: dict[str, list[float]] = {"tb_export": [], "mee_export": [], "raw_read": []}
        peaks: list[int] = []
        for i in range(args.repeat):
            print(f"export round {i + 1} of {args.repeat}", flush=True)
            for d in (bundle, mee_dir):
                shutil.rmtree(d, ignore_errors=True)
            measure(
                "tb_export",
                "trackbridge export",
                tb("export", src_uri, str(bundle), "--experiment", EXPERIMENT, *workers),
            )
            measure(
                "mee_export",
                "mlflow-export-import export",
                [
                    str(mee_bin / "export-experiment"),
                    "--experiment",
                    EXPERIMENT,
                    "--output-dir",
                    str(mee_dir),
                ],
                env={**ENV, "MLFLOW_TRACKING_URI": src_url},
            )
            t = time.perf_counter()
            n = raw_read(src_url, runs, args.metrics, args.workers)
            res["raw_read_s"] = time.perf_counter() - t
            assert n == points, (n, points)
            print(f"{'raw REST reads (ceiling)':<34} {res['raw_read_s']:7.1f} s", flush=True)
            for k, v in rounds.items():
                v.append(res[f"{k}_s"])
            peaks.append(res["tb_export_rss_mb"])
        for k, v in rounds.items():
            res[f"{k}_rounds_s"] = v
            res[f"{k}_s"] = statistics.median(v)
        res["tb_export_rss_mb"] = max(peaks)
        shutil.rmtree(small, ignore_errors=True)
        sel = [a for r in runs[: args.small_runs] for a in ("--run", r["run_id"])]
        measure(
            "tb_export_small",
            f"trackbridge export ({args.small_runs} runs)",
            tb("export", src_uri, str(small), "--experiment", EXPERIMENT, *workers, *sel),
        )

    # ---- import, each contender into a fresh server
    if not args.no_import:
        with Server("dest-trackbridge", args.server_workers) as url:
            measure("tb_import", "trackbridge import", tb("import", str(bundle), f"mlflow+{url}", *workers))
            measure(
                "tb_reimport",
                "trackbridge re-import (no changes)",
                tb("import", str(bundle), f"mlflow+{url}"),
            )
        with Server("dest-trackbridge-small", args.server_workers) as url:
            measure(
                "tb_import_small",
                f"trackbridge import ({args.small_runs} runs)",
                tb("import", str(small), f"mlflow+{url}", *workers),
            )
        with Server("dest-mee", args.server_workers) as url:
            measure(
                "mee_import",
                "mlflow-export-import import",
                [
                    str(mee_bin / "import-experiment"),
                    "--experiment-name",
                    EXPERIMENT,
                    "--input-dir",
                    str(mee_dir),
                ],
                env={**ENV, "MLFLOW_TRACKING_URI": url},
            )
        with Server("dest-restore", args.server_workers) as url:
            measure(
                "tb_restore",
                "trackbridge restore of that folder",
                tb("migrate", f"mlflow-export-import://{mee_dir}", f"mlflow+{url}", "--no-verify", *workers),
            )
        payload = raw_payload(bundle)
        with Server("dest-raw", args.server_workers) as url:
            t = time.perf_counter()
            raw_write(url, payload, WORK / "artifact.bin", args.workers)
            res["raw_write_s"] = time.perf_counter() - t
            print(f"{'raw REST writes (ceiling)':<34} {res['raw_write_s']:7.1f} s", flush=True)

    res["export_vs_mee"] = res["mee_export_s"] / res["tb_export_s"]
    res["export_vs_raw"] = res["raw_read_s"] / res["tb_export_s"]
    print(
        "\nratios (higher is better for trackbridge; targets in brackets; export: medians of "
        f"{args.repeat} rounds)"
    )
    print(
        f"  export: {res['export_vs_mee']:.2f}x mlflow-export-import [>= 3], "
        f"{res['export_vs_raw']:.2f}x raw ceiling [>= 0.8]"
    )
    print(
        f"  peak memory, export: {res['tb_export_small_rss_mb']} MiB ({args.small_runs} runs) vs "
        f"{res['tb_export_rss_mb']} MiB ({args.runs} runs)"
    )
    if not args.no_import:
        res["import_vs_mee"] = res["mee_import_s"] / res["tb_import_s"]
        res["import_vs_raw"] = res["raw_write_s"] / res["tb_import_s"]
        print(
            f"  import: {res['import_vs_mee']:.2f}x mlflow-export-import [>= 2], "
            f"{res['import_vs_raw']:.2f}x raw ceiling [>= 0.8]"
        )
        res["restore_vs_mee"] = res["mee_import_s"] / res["tb_restore_s"]
        print(
            f"  restore of mlflow-export-import's folder: {res['restore_vs_mee']:.2f}x its own import "
            f"[no target], peak {res['tb_restore_rss_mb']} MiB"
        )
        print(
            f"  peak memory, import: {res['tb_import_small_rss_mb']} MiB ({args.small_runs} runs) vs "
            f"{res['tb_import_rss_mb']} MiB ({args.runs} runs)"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
