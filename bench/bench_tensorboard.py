"""Reading TensorBoard event files: trackbridge's reader against TensorBoard's own
``EventFileLoader`` on the same file, side by side in one run (issue 18).

    python bench/bench_tensorboard.py                  # 500,000 scalar events
    python bench/bench_tensorboard.py --shape mixed      # three tags of different lengths a step
    python bench/bench_tensorboard.py --events 100000 --json bench/results/tensorboard.json

The file is written once by PyTorch's ``SummaryWriter`` (one scalar an event, the common
case: ``add_scalar`` in a training loop) and kept in bench/.work. Both readers check
every record's CRC-32C and decode every event; ``EventFileLoader`` is timed iterating
its events, trackbridge reading the records and decoding them into its columns.
Each is run once untimed (imports, the file into the page cache), then three times,
alternating; the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


# the tags a step logs: five of one length (metric/0 … metric/4), or three of different
# lengths, as a training loop logs its loss, learning rate and validation accuracy
SHAPES = {"uniform": [f"metric/{k}" for k in range(5)], "mixed": ["loss", "learning_rate", "val/accuracy"]}


def fixture(events: int, shape: str = "uniform") -> Path:
    folder = HERE / ".work" / (f"tensorboard-{events}" + ("" if shape == "uniform" else f"-{shape}"))
    done = folder / "done"
    if not done.exists():
        from torch.utils.tensorboard import SummaryWriter

        tags = SHAPES[shape]
        t = time.perf_counter()
        with SummaryWriter(str(folder / "run"), max_queue=10_000) as w:
            for i in range(events):
                w.add_scalar(tags[i % len(tags)], i * 0.001, i // len(tags))
        done.touch()
        print(f"wrote {events} scalar events in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return next((folder / "run").glob("events.out.tfevents.*"))


def tensorboard_loader(path: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    n = 0
    for _ in EventFileLoader(str(path)).Load():
        n += 1
    return n


def trackbridge_reader(path: Path) -> int:
    from trackbridge.exporters.tensorboard import events as ev
    from trackbridge.trackers.tensorboard.tfrecord import read_records

    got = ev.Events()
    records = read_records(path)
    ev.read_events(records, got)
    got.metrics("bench")
    return len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="uniform", help="the tags each step logs")
    ap.add_argument("--json")
    a = ap.parse_args()
    path = fixture(a.events, a.shape)
    times: dict[str, list[float]] = {"eventfileloader": [], "trackbridge": []}
    counts = {}
    tensorboard_loader(path), trackbridge_reader(path)  # once untimed: imports, the file in the page cache
    for _ in range(3):
        for name, fn in (("eventfileloader", tensorboard_loader), ("trackbridge", trackbridge_reader)):
            t = time.perf_counter()
            counts[name] = fn(path)
            times[name].append(time.perf_counter() - t)
    assert counts["eventfileloader"] == counts["trackbridge"], counts
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["eventfileloader"] / med["trackbridge"]
    for k, v in med.items():
        each = ", ".join(f"{x:.2f}" for x in times[k])
        print(f"{k:16s} {v:7.2f} s  {counts[k] / v:12,.0f} events/s  (runs: {each})")
    print(f"trackbridge / EventFileLoader = {ratio:.1f}x (target >= 20x), {counts['trackbridge']:,} events")
    if a.json:
        result = {
            "events": counts["trackbridge"],
            "shape": a.shape,
            "file_bytes": path.stat().st_size,
            "seconds": times,
            "median_s": med,
            "ratio": round(ratio, 2),
            "cpus": os.cpu_count(),
        }
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
