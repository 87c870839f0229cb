"""How fast the offline reader turns a ``.wandb`` history into Arrow, against the raw scan.

One command: ``python bench/bench_wandb_reader.py [--steps 100000 --keys 10]``. The
fixture is written once by the real wandb SDK (offline) into bench/.work and reused.

- raw: framing, CRC and ``Record.ParseFromString`` for every record, nothing else. This
  is the ceiling for any Python reader built on the SDK's protobuf classes.
- trackbridge: ``WandbOfflineSource.read_run`` plus materialising the metrics table.
Both run on one core in this process; the report gives points/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

WRITER = r"""
import os, sys, math
steps, keys = int(sys.argv[1]), int(sys.argv[2])
import wandb
run = wandb.init(project="bench", name="big", settings=wandb.Settings(
    mode="offline", x_disable_stats=True, console="off", disable_git=True, save_code=False))
names = [f"metric_{k}" for k in range(keys)]
for s in range(steps):
    run.log({n: math.sin(s * 0.001 + i) for i, n in enumerate(names)}, step=s)
run.finish()
"""


def fixture(steps: int, keys: int) -> Path:
    root = HERE / ".work" / f"wandb-{steps}x{keys}"
    if not list(root.glob("wandb/offline-run-*/run-*.wandb")):
        from trackbridge.trackers.wandb.common import sandbox_env

        root.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **sandbox_env(root),
            "HOME": str(root),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
        }
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRITER, str(steps), str(keys)], env=env, check=True)
        print(f"fixture: {steps} steps x {keys} keys written by wandb.log in {time.perf_counter() - t:.1f} s")
    return root


def raw_scan(log: Path) -> int:
    from trackbridge.trackers.wandb.leveldb import RecordLog
    from wandb.proto import wandb_internal_pb2 as pb

    rec = pb.Record()
    n = 0
    for _, payload in RecordLog(log).payloads():
        rec.ParseFromString(payload)
        n += 1
    return n


def ours(root: Path) -> int:
    from trackbridge.exporters.wandb.offline import WandbOfflineSource
    from trackbridge.model import Selection

    src = WandbOfflineSource(str(root))
    sel = Selection()
    total = 0
    for row in src.runs(sel, src.projects(sel)):
        payload = src.read_run(row)
        total += sum(b.num_rows for b in payload.metrics())
    return total


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = fixture(a.steps, a.keys)
    log = next(root.glob("wandb/offline-run-*/run-*.wandb"))
    points = ours(root)  # also warms imports and the page cache
    user_points = a.steps * a.keys
    t_raw = best_of(lambda: raw_scan(log), a.repeat)
    t_ours = best_of(lambda: ours(root), a.repeat)
    res = {
        "steps": a.steps,
        "keys": a.keys,
        "file_mb": round(log.stat().st_size / 2**20, 1),
        "points_in_arrow": points,
        "user_points": user_points,
        "raw_scan_s": round(t_raw, 3),
        "trackbridge_s": round(t_ours, 3),
        "raw_points_per_s": round(user_points / t_raw),
        "trackbridge_points_per_s": round(user_points / t_ours),
        "ratio_vs_raw": round(t_raw / t_ours, 3),
    }
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
