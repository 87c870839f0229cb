"""Quiet-night cost of `trackbridge sync`, against a full migration of the same runs.

Target (issue 5): with nothing new across 1,000 already-synced runs, a sync costs at
most 5% of a full migration's time.

    python bench/bench_sync.py                 # 1,000 runs x 100 steps x 5 keys
    python bench/bench_sync.py --runs 200 --json bench/results/sync-200.json

The W&B source is written once by the real SDK in offline mode (about 0.4 s a run) and
kept in bench/.work. Each measurement is the wall time of the real command, start-up
included, as cron would see it:

- full:   the first sync into an empty SQLite MLflow store (every run read and written);
- quiet:  the same sync again (nothing changed), three times, the median;
- quiet, state folder deleted: identity comes back from the destination;
- --full: every run read and compared, nothing written (what a quiet night costs
          without change tokens);
- the trackers' floor: what any sync of W&B offline runs into this store pays before
  it looks at one run (Python, both SDKs imported, the store opened, one query), three
  times between the quiet nights, the median.

The full night has its own target (issue 17): 1,000 runs in at most 20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"

WRITER = r"""
import sys, wandb
n, steps, keys = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    settings = wandb.Settings(mode="offline", x_disable_stats=True, console="off", save_code=False)
    run = wandb.init(project="bench-sync", name=f"run-{i:04d}", config={"lr": 0.001 * (i + 1), "seed": i},
                     tags=["nightly"] if i % 2 else ["nightly", "candidate"], settings=settings)
    for s in range(steps):
        run.log({f"metric/{k}": (s + 1) * 0.001 * (k + 1) for k in range(keys)}, step=s)
    run.summary["best"] = steps * 0.5
    run.finish()
"""


def env_for(root: Path) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        env[var] = str(root / var.lower())
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(root / "home")
    env["TRACKBRIDGE_STATE_DIR"] = str(root / "state")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def fixture(runs: int, steps: int, keys: int) -> Path:
    root = WORK / f"sync-src-{runs}x{steps}x{keys}"
    done = root / "done"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", WRITER, str(runs), str(steps), str(keys)], env=env_for(root), check=True
        )
        print(f"wrote {runs} W&B offline runs in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        done.touch()
    return root


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "trackbridge.cli", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"exit {p.returncode}: {' '.join(args)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return took, p.stdout


FLOOR = """
import sys
from mlflow import MlflowClient
MlflowClient(sys.argv[1]).search_experiments()
from wandb.proto import wandb_internal_pb2
"""


def floor(db: Path, env: dict[str, str]) -> float:
    """What any command that syncs W&B offline runs into this MLflow store pays before
    it looks at one run: Python, ``import mlflow``, MLflow's store (its schema check) and
    one query, and W&B's record classes (``import wandb``), which reading even the head
    of a run's log takes."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR, f"sqlite:///{db}"], env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def runs_line(out: str) -> str:
    m = re.search(r"runs: .*", out)
    return m.group(0) if m else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--keys", type=int, default=5)
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()

    root = fixture(a.runs, a.steps, a.keys)
    env = env_for(root)
    db = root / "dest.db"
    for p in (db, root / "dest-artifacts", root / "state"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    src = f"wandb+offline://{root / 'wandb_dir' / 'wandb'}"
    dest = f"mlflow+sqlite:///{db}"

    full, out = timed(["sync", src, dest], env)
    print(f"full sync      {full:8.2f} s  {runs_line(out)}")
    # the quiet night and the floor, alternated three times, each the median of its three:
    # they are short, and the machine's noise is not
    quiets, floors = [], []
    for _ in range(3):
        took, out = timed(["sync", src, dest], env)
        quiets.append(took)
        floors.append(floor(db, env))
    quiet, opened = statistics.median(quiets), statistics.median(floors)
    each = ", ".join(f"{q:.2f}" for q in quiets)
    print(f"quiet night    {quiet:8.2f} s  {runs_line(out)}  (median of {each})")
    shutil.rmtree(root / "state")
    rebuilt, out = timed(["sync", src, dest], env)
    print(f"quiet, no state{rebuilt:8.2f} s  {runs_line(out)}")
    reread, out = timed(["sync", src, dest, "--full"], env)
    print(f"quiet, --full  {reread:8.2f} s  {runs_line(out)}")
    baseline, _ = timed(["--version"], env)
    print(f"start-up alone {baseline:8.2f} s  (python, click; MLflow loads only when used)")
    print(
        f"trackers' floor{opened:8.2f} s  (python, import mlflow, open the store, one query, import wandb;"
        f" median of {', '.join(f'{x:.2f}' for x in floors)})"
    )
    ratio = quiet / full
    print(
        f"\nquiet / full = {ratio:.1%} (target <= 5%); the floor alone {opened / full:.1%}, "
        f"quiet above it {(quiet - opened) / full:.1%}"
    )
    print(f"without state {rebuilt / full:.1%}; with --full {reread / full:.1%}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(
            json.dumps(
                {
                    "runs": a.runs,
                    "steps": a.steps,
                    "keys": a.keys,
                    "points": a.runs * a.steps * a.keys,
                    "full_s": round(full, 3),
                    "quiet_s": round(quiet, 3),
                    "quiet_no_state_s": round(rebuilt, 3),
                    "quiet_full_reread_s": round(reread, 3),
                    "startup_s": round(baseline, 3),
                    "trackers_floor_s": round(opened, 3),
                    "quiet_above_floor_s": round(quiet - opened, 3),
                    "quiet_over_full": round(ratio, 4),
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
