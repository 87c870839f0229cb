"""Training-thread cost of the shim's ``log()``, against calling the trackers directly.

Targets (issue 6): ``log()`` with 10 scalars costs p50 ≤ 10 µs and p99 ≤ 100 µs on the
training thread; the shim sustains ≥ 20,000 calls/s end to end into an MLflow SQLite
store and a W&B offline run; memory stays flat over 1M calls.

    python bench/bench_shim.py                       # 1,000,000 calls
    python bench/bench_shim.py --calls 200000 --json bench/results/shim-200k.json

Measured in one run, side by side:
- memory: ``run.log(10 scalars)`` at 20,000 calls/s for 1M calls, RSS every 100,000;
- shim:   ``run.log(10 scalars)`` with both destinations live; every call timed with
          ``perf_counter_ns``; RSS sampled every 100,000 calls; then ``finish()`` (both
          destinations completed from the spool) timed, for the end-to-end rate;
- the same end to end with one destination at a time (each in a fresh process);
- wandb:  ``wandb.log(10 scalars)`` on an offline run (the SDK's public path);
- mlflow: ``mlflow.log_metrics(10 scalars)`` into a SQLite store (the fluent API), and
          ``MlflowClient.log_batch`` of 1,000 points;
- the destinations' physical ceilings: ``sqlite3.executemany`` into MLflow's own
  ``metrics`` table, and prebuilt history records handed to wandb-core, W&B's writer.
The references log fewer calls (they are slow), which does not change a per-call time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "shim"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(xs: list[int] | array, p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] / 1000  # µs


def row(i: int) -> dict[str, float]:
    return {f"k{j}": i + j / 10 for j in range(10)}


def bench_shim(calls: int, to: str = "both") -> dict:
    """``calls`` calls of ``run.log``, then ``finish()``: every destination complete.
    ``to``: "both", "mlflow" (SQLite) or "wandb" (offline)."""
    import trackbridge

    dests = {
        "mlflow": [f"mlflow+sqlite:///{WORK / f'shim-{to}.db'}"],
        "wandb": [f"wandb+offline://{WORK / f'wb-{to}'}"],
    }
    run = trackbridge.init(
        project=f"bench-shim-{to}",
        to=dests["mlflow"] + dests["wandb"] if to == "both" else dests[to],
        spool=WORK / f"spool-{to}",
    )
    times = array("q", bytes(8 * calls))  # allocated up front: RSS shows the shim, not us
    rss = [(0, rss_mib())]
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for i in range(calls):
        a = clock()
        run.log(row(i), step=i)
        times[i] = clock() - a
        if (i + 1) % 100_000 == 0:
            rss.append((i + 1, rss_mib()))
    logged = time.perf_counter() - t0
    peak = [rss_mib()]
    finishing = threading.Event()

    def sample() -> None:  # RSS while finish() completes the destinations
        while not finishing.wait(0.1):
            peak[0] = max(peak[0], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outcome = run.finish(timeout=3600, quiet=True)
    total = time.perf_counter() - t0
    finishing.set()
    sampler.join()
    return {
        "calls": calls,
        "p50_us": pct(times, 0.50),
        "p99_us": pct(times, 0.99),
        "p999_us": pct(times, 0.999),
        "mean_us": statistics.fmean(times) / 1000,
        "logging_seconds": round(logged, 2),
        "end_to_end_seconds": round(total, 2),
        "end_to_end_calls_per_s": round(calls / total),
        "outcome": outcome,
        "rss_mib": [(n, round(m, 1)) for n, m in rss],
        "peak_rss_during_finish_mib": round(peak[0], 1),
    }


def bench_paced_memory(calls: int, rate: int) -> dict:
    """Memory while training logs at the target rate for ``calls`` calls: RSS every
    100,000 calls. Destinations are live (MLflow fed until it falls a backlog behind);
    the run is then left unfinished (``finish`` with no wait), since this measures the
    training side only."""
    import trackbridge

    run = trackbridge.init(
        project="bench-shim-paced",
        to=[f"mlflow+sqlite:///{WORK / 'paced.db'}", f"wandb+offline://{WORK / 'wb-paced'}"],
        spool=WORK / "spool-paced",
    )
    rss = [(0, rss_mib())]
    t0 = time.perf_counter()
    for i in range(calls):
        run.log(row(i), step=i)
        if i % 1000 == 999:  # keep to the rate: sleep off what is ahead of the clock
            ahead = (i + 1) / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
        if (i + 1) % 100_000 == 0:
            rss.append((i + 1, rss_mib()))
    secs = time.perf_counter() - t0
    spooled = run.flush_spool(timeout=600)
    # no finish(): this runs in its own process (see main), which exits right after, so
    # the destinations' catch-up never competes with the end-to-end measurement
    return {
        "calls": calls,
        "target_rate": rate,
        "achieved_calls_per_s": round(calls / secs),
        "spool_kept_up": spooled,
        "rss_mib": [(n, round(m, 1)) for n, m in rss],
        "rss_growth_after_first_100k_mib": round(rss[-1][1] - rss[1][1], 1),
    }


def bench_wandb(calls: int) -> dict:
    import wandb

    run = wandb.init(
        project="bench-shim-ref",
        dir=str(WORK / "wbref"),
        settings=wandb.Settings(mode="offline", console="off", x_disable_stats=True, silent=True),
    )
    times = []
    clock = time.perf_counter_ns
    for i in range(calls):
        a = clock()
        run.log(row(i), step=i)
        times.append(clock() - a)
    run.finish()
    return {"calls": calls, "p50_us": pct(times, 0.5), "p99_us": pct(times, 0.99)}


def bench_mlflow(calls: int) -> dict:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{WORK / 'ref.db'}")
    times = []
    clock = time.perf_counter_ns
    with mlflow.start_run():
        for i in range(calls):
            a = clock()
            mlflow.log_metrics(row(i), step=i)
            times.append(clock() - a)
    return {"calls": calls, "p50_us": pct(times, 0.5), "p99_us": pct(times, 0.99)}


def bench_mlflow_ceiling(points: int) -> dict:
    """The MLflow side as a user would drive it in bulk: ``MlflowClient.log_batch`` with
    1,000 ``Metric`` objects a request (MLflow's maximum) into a SQLite store."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    c = MlflowClient(f"sqlite:///{WORK / 'ceiling.db'}")
    run_id = c.create_run(c.create_experiment("ceiling")).info.run_id
    now = int(time.time() * 1000)
    t0 = time.perf_counter()
    for start in range(0, points, 1000):
        c.log_batch(
            run_id, metrics=[Metric(f"k{i % 10}", float(i), now, i // 10) for i in range(start, start + 1000)]
        )
    dt = time.perf_counter() - t0
    return {
        "points": points,
        "seconds": round(dt, 2),
        "points_per_s": round(points / dt),
        "calls_per_s_at_10_keys": round(points / dt / 10),
    }


def bench_sqlite_ceiling(points: int) -> dict:
    """What SQLite itself takes into MLflow's ``metrics`` table (its primary key and two
    indexes, as MLflow creates them): ``sqlite3.executemany`` of ready tuples, sorted by
    key and step, 50,000 a transaction. No client can write a SQLite store faster."""
    import sqlite3

    from mlflow import MlflowClient

    db = WORK / "sqlite-ceiling.db"
    c = MlflowClient(f"sqlite:///{db}")
    run_id = c.create_run(c.create_experiment("ceiling")).info.run_id
    now = int(time.time() * 1000)
    per_key = points // 10
    rows = [(f"k{k}", float(i), now + i, run_id, i, False) for k in range(10) for i in range(per_key)]
    con = sqlite3.connect(db)
    t0 = time.perf_counter()
    for start in range(0, len(rows), 50_000):
        con.executemany(
            "INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows[start : start + 50_000],
        )
        con.commit()
    dt = time.perf_counter() - t0
    con.close()
    return {
        "points": len(rows),
        "seconds": round(dt, 2),
        "points_per_s": round(len(rows) / dt),
        "calls_per_s_at_10_keys": round(len(rows) / dt / 10),
    }


def bench_wandb_core_ceiling(rows: int) -> dict:
    """The fastest way into an offline ``.wandb`` file through W&B's own writer
    (wandb-core): history records built beforehand and handed to the SDK's internal
    interface without waiting for each, then ``finish()`` until wandb-core has written
    them all. A reference only (private API): ``wandb.log`` is the public path."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    run = wandb.init(
        project="bench-shim-core",
        dir=str(WORK / "wbcore"),
        settings=wandb.Settings(mode="offline", console="off", x_disable_stats=True, silent=True),
    )
    iface = run._interface
    now = time.time()
    records = []
    for i in range(rows):
        h = pb.HistoryRecord()
        for k, v in row(i).items():
            it = h.item.add()
            it.key, it.value_json = k, repr(v)
        for k, v in (("_step", str(i)), ("_timestamp", repr(now + i / 1000))):
            it = h.item.add()
            it.key, it.value_json = k, v
        h.step.num = i
        records.append(iface._make_record(history=h))
    t0 = time.perf_counter()
    for rec in records:
        iface._publish(rec, nowait=True)
    handed = time.perf_counter() - t0
    run.finish()
    dt = time.perf_counter() - t0
    return {
        "rows": rows,
        "handed_over_seconds": round(handed, 2),
        "seconds_until_written": round(dt, 2),
        "rows_per_s": round(rows / dt),
    }


def _in_subprocess(*args: str) -> dict:
    import subprocess

    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1_000_000, help="unpaced calls (latency, end to end)")
    ap.add_argument("--paced-calls", type=int, default=1_000_000, help="calls at 20,000/s (memory)")
    ap.add_argument("--json", default=str(HERE / "results" / "shim.json"))
    ap.add_argument("--paced-only", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--shim-only", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paced_only:
        print(json.dumps(bench_paced_memory(args.paced_only, 20_000)), flush=True)
        os._exit(0)  # leave the live destinations' threads behind, unfinished
    if args.shim_only:
        print(json.dumps(bench_shim(int(args.shim_only[0]), args.shim_only[1])), flush=True)
        return
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    for k in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        os.environ[k] = str(WORK / "wandb-home")
    os.environ.update(WANDB_MODE="offline", MLFLOW_DISABLE_TELEMETRY="true", WANDB_SILENT="true")
    out = {
        "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
        "wandb_log": bench_wandb(20_000),
        "mlflow_log_metrics": bench_mlflow(2_000),
        "mlflow_log_batch_ceiling": bench_mlflow_ceiling(200_000),
        "sqlite_insert_ceiling": bench_sqlite_ceiling(2_000_000),
        "wandb_core_ceiling": bench_wandb_core_ceiling(100_000),
        "shim_paced_memory": _in_subprocess("--paced-only", str(args.paced_calls)),
        # each in a fresh process, so each pays MLflow's import and store creation
        "shim_mlflow_only": _in_subprocess("--shim-only", str(args.calls), "mlflow"),
        "shim_wandb_only": _in_subprocess("--shim-only", str(args.calls), "wandb"),
        "shim_log": bench_shim(args.calls),
    }
    s, w, m = out["shim_log"], out["wandb_log"], out["mlflow_log_metrics"]
    w_calls_per_s = round(1e6 / w["p50_us"])
    out["ratios"] = {
        "end_to_end_over_mlflow_ceiling": round(
            s["end_to_end_calls_per_s"] / out["mlflow_log_batch_ceiling"]["calls_per_s_at_10_keys"], 2
        ),
        "mlflow_only_over_sqlite_ceiling": round(
            out["shim_mlflow_only"]["end_to_end_calls_per_s"]
            / out["sqlite_insert_ceiling"]["calls_per_s_at_10_keys"],
            2,
        ),
        "wandb_only_over_wandb_core_ceiling": round(
            out["shim_wandb_only"]["end_to_end_calls_per_s"] / out["wandb_core_ceiling"]["rows_per_s"], 2
        ),
        "wandb_sdk_calls_per_s_at_p50": w_calls_per_s,
        "wandb_p50_over_shim_p50": round(w["p50_us"] / s["p50_us"], 1),
        "mlflow_p50_over_shim_p50": round(m["p50_us"] / s["p50_us"], 1),
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
