"""Neptune data in its three forms, made the way users made it.

The two offline folders are written by the real ``neptune`` (1.x) and ``neptune-scale``
SDKs in offline mode, with no token, each in a subprocess whose home and working folder
are temporary (the SDKs write ``.neptune`` into the working folder). The neptune-exporter
Parquet is built with pyarrow to that tool's schema. Every form carries what the readers
must keep: fractional steps, typed values, string sets, series of strings, histograms
and files, tags, forks, and a file that is gone by the time we read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU"
    b"\x00\x00\x00\nIDATx\x9cc`\x00\x00\x00\x02\x00\x01H\xaf\xa4q\x00\x00\x00\x00IEND\xaeB`\x82"
)

LEGACY = """
import neptune
from datetime import datetime, timezone
from neptune.types import File, StringSet
run = neptune.init_run(project="ws/legacy", mode="offline", name="legacy run", tags=["baseline", "cnn"],
    description="a 1.x run", capture_stdout=False, capture_stderr=False, capture_hardware_metrics=False,
    capture_traceback=False, source_files=[], git_ref=False)
run["parameters"] = {"lr": 0.001, "epochs": 3, "augment": True, "optimizer": "adam",
                     "model": {"depth": 18, "dropout": 0.25}}
run["parameters/started"] = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
run["data/classes"] = StringSet(["cat", "dog"])
run["sys/tags"].add(["extra"])
run["scratch"] = 1
del run["scratch"]
for i in range(10):
    run["train/loss"].append(1.0 / (i + 1), step=i * 0.5, timestamp=1750000000 + i)
    run["train/log"].append(f"step {i}", step=i * 0.5, timestamp=1750000000 + i)
for v in (0.5, 0.6, 0.7):
    run["eval/acc"].append(v)  # no step: Neptune numbers them 0, 1, 2
run["train/loss"].append(float("nan"), step=5.0, timestamp=1750000010)
run["samples"].append(File.from_content(PNG, extension="png"), step=0)
run["model/weights"].upload(File.from_content(b"weights-bytes", extension="bin"))
open("config.yaml", "w").write("lr: 0.001\\n")
run["data/config"].upload("config.yaml")
open("gone.txt", "w").write("deleted after the run")
run["data/gone"].upload("gone.txt")
import os
os.makedirs("assets", exist_ok=True)
open("assets/a.txt", "w").write("a")
open("assets/b.txt", "w").write("bb")
run["data/assets"].upload_files("assets/*.txt")
run.stop()
os.remove("gone.txt")
"""

SCALE = """
from datetime import datetime, timezone
from neptune_scale import Run
from neptune_scale.types import Histogram
import os
open("notes.txt", "w").write("scale file")
open("gone.txt", "w").write("deleted after the run")
with Run(project="ws/scale", run_id="base-1", mode="offline", experiment_name="resnet-sweep",
         creation_time=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
         enable_console_log_capture=False) as run:
    run.log_configs({"params/lr": 0.1, "params/batch": 64, "params/amp": True, "params/name": "r18",
                     "params/when": datetime(2024, 5, 6, tzinfo=timezone.utc),
                     "params/aug": ["flip", "crop"]})
    run.add_tags(["sweep", "gpu"])
    run.add_tags(["family-a"], group_tags=True)
    for i in range(8):
        run.log_metrics({"train/loss": 2.0 / (i + 1), "train/acc": i / 10}, step=i * 0.25,
                        timestamp=datetime(2025, 1, 2, 4, 0, i, tzinfo=timezone.utc))
    run.log_metrics({"val/loss": 0.9}, step=3, preview=True, preview_completion=0.5)
    run.log_metrics({"val/loss": 0.8}, step=3)
    run.log_metrics({"val/loss": 0.7}, step=4, preview=True, preview_completion=0.5)
    run.log_string_series({"logs/stdout": "epoch 1 done"}, step=1)
    run.log_string_series({"logs/stdout": "epoch 2 done"}, step=2)
    run.log_histograms({"weights/hist": Histogram(bin_edges=[0.0, 0.5, 1.0], counts=[3, 5])}, step=1)
    run.assign_files({"files/notes": "notes.txt", "files/gone": "gone.txt", "files/blob": b"raw bytes"})
    run.log_files({"media/frame": b"frame-0"}, step=0)
    run.log_files({"media/frame": b"frame-1"}, step=1)
with Run(project="ws/scale", run_id="fork-1", mode="offline", fork_run_id="base-1", fork_step=1.5,
         enable_console_log_capture=False) as run:
    run.log_metrics({"train/loss": 0.3}, step=2)
    run.log_metrics({"train/loss": 0.2}, step=3)
os.remove("gone.txt")
"""


def _sdk(script: str, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEPTUNE")}
    env.update(HOME=str(where / "home"), NEPTUNE_MODE="offline", PYTHONPATH="")
    code = f"PNG = {PNG!r}\n" + textwrap.dedent(script)
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=where, env=env, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stderr[-3000:]


def write_legacy(where: Path) -> Path:
    """A neptune 1.x offline folder; returns the folder holding ``.neptune``."""
    _sdk(LEGACY, where)
    return where


def write_scale(where: Path) -> Path:
    """A neptune-scale offline folder with a run and its fork; returns ``.neptune``."""
    _sdk(SCALE, where)
    return where / ".neptune"


EXPORT_SCHEMA_COLUMNS = (
    "project_id",
    "run_id",
    "attribute_path",
    "attribute_type",
    "step",
    "timestamp",
    "int_value",
    "float_value",
    "string_value",
    "bool_value",
    "datetime_value",
    "string_set_value",
    "file_value",
    "histogram_value",
)


def _rows(project: str, rid: str, rows: list[dict]) -> pa.Table:
    from trackbridge.exporters.neptune.exporter import EXPORT_SCHEMA

    full = [
        {c: None for c in EXPORT_SCHEMA_COLUMNS} | {"project_id": project, "run_id": rid} | r for r in rows
    ]
    return pa.Table.from_pylist(full, schema=EXPORT_SCHEMA)


def _t(second: int) -> datetime:
    return datetime(2025, 3, 1, 10, 0, second, tzinfo=UTC)


def write_exporter(where: Path) -> Path:
    """What neptune-exporter writes for one project: two runs (one a fork), a model and
    two of its versions, and the files folder; returns the export root."""
    project = "ws/exported"
    data = where / "data" / "ws_exported"
    files = where / "files"
    (data / "models").mkdir(parents=True)
    (data / "model_versions").mkdir(parents=True)
    for rel, content in {
        "ws_exported/RUN-1/model/ckpt.pt": b"checkpoint",
        "ws_exported/RUN-1/preds/0.png": PNG,
        "ws_exported/RUN-1/preds/1.5.png": PNG + b"x",
        "ws_exported/RUN-1/dataset/part-a.csv": b"a,b\n",
        "ws_exported/RUN-1/dataset/sub/part-b.csv": b"c,d\n",
        "ws_exported/model_versions/CLS-MOD-1/model/bin.pkl": b"model-one",
        "ws_exported/model_versions/CLS-MOD-2/model/bin.pkl": b"model-two",
    }.items():
        p = files / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    run1 = [
        {"attribute_path": "sys/id", "attribute_type": "string", "string_value": "EXP-1"},
        {"attribute_path": "sys/custom_run_id", "attribute_type": "string", "string_value": "custom-abc"},
        {"attribute_path": "sys/name", "attribute_type": "string", "string_value": "exported run"},
        {"attribute_path": "sys/creation_time", "attribute_type": "datetime", "datetime_value": _t(0)},
        {"attribute_path": "sys/owner", "attribute_type": "string", "string_value": "alice"},
        {"attribute_path": "sys/failed", "attribute_type": "bool", "bool_value": False},
        {"attribute_path": "sys/state", "attribute_type": "string", "string_value": "Inactive"},
        {"attribute_path": "sys/tags", "attribute_type": "string_set", "string_set_value": ["prod", "v2"]},
        {"attribute_path": "sys/experiment/name", "attribute_type": "string", "string_value": "exp-main"},
        {"attribute_path": "config/lr", "attribute_type": "float", "float_value": 0.01},
        {"attribute_path": "config/layers", "attribute_type": "int", "int_value": 4},
        {"attribute_path": "config/nested/flag", "attribute_type": "bool", "bool_value": True},
        {"attribute_path": "config/start", "attribute_type": "datetime", "datetime_value": _t(1)},
        {"attribute_path": "config/langs", "attribute_type": "string_set", "string_set_value": ["en", "pl"]},
        {
            "attribute_path": "model/ckpt",
            "attribute_type": "file",
            "file_value": {"path": "ws_exported/RUN-1/model/ckpt.pt"},
        },
        {
            "attribute_path": "model/missing",
            "attribute_type": "file",
            "file_value": {"path": "ws_exported/RUN-1/model/nope.pt"},
        },
        {
            "attribute_path": "dataset",
            "attribute_type": "file_set",
            "file_value": {"path": "ws_exported/RUN-1/dataset"},
        },
    ]
    steps = [
        Decimal("0"),
        Decimal("0.000001"),
        Decimal("0.5"),
        Decimal("1"),
        Decimal("1.5"),
        Decimal("123456.25"),
    ]
    for i, s in enumerate(steps):
        run1.append(
            {
                "attribute_path": "train/loss",
                "attribute_type": "float_series",
                "step": s,
                "timestamp": _t(i),
                "float_value": 1.0 / (i + 1),
            }
        )
    run1.append(
        {
            "attribute_path": "train/loss",
            "attribute_type": "float_series",
            "step": Decimal("200000"),
            "timestamp": _t(9),
            "float_value": float("nan"),
        }
    )
    for i in range(3):
        run1.append(
            {
                "attribute_path": "logs/msg",
                "attribute_type": "string_series",
                "step": Decimal(i),
                "timestamp": _t(i),
                "string_value": f"msg {i}",
            }
        )
    run1.append(
        {
            "attribute_path": "grads",
            "attribute_type": "histogram_series",
            "step": Decimal("2"),
            "timestamp": _t(3),
            "histogram_value": {"type": "COUNTS", "edges": [0.0, 1.0, 2.0], "values": [1.0, 2.0]},
        }
    )
    run1.append(
        {
            "attribute_path": "preds",
            "attribute_type": "file_series",
            "step": Decimal("0"),
            "timestamp": _t(4),
            "file_value": {"path": "ws_exported/RUN-1/preds/0.png"},
        }
    )
    run1.append(
        {
            "attribute_path": "preds",
            "attribute_type": "file_series",
            "step": Decimal("1.5"),
            "timestamp": _t(5),
            "file_value": {"path": "ws_exported/RUN-1/preds/1.5.png"},
        }
    )
    # split across two parts, as the tool does for big runs
    t1 = _rows(project, "RUN-1", run1)
    pq.write_table(t1.slice(0, 20), data / "RUN-1_part_0.parquet")
    pq.write_table(t1.slice(20), data / "RUN-1_part_1.parquet")
    run2 = [
        {"attribute_path": "sys/id", "attribute_type": "string", "string_value": "EXP-2"},
        {"attribute_path": "sys/creation_time", "attribute_type": "datetime", "datetime_value": _t(30)},
        {"attribute_path": "sys/forking/parent", "attribute_type": "string", "string_value": "RUN-1"},
        {"attribute_path": "sys/forking/step", "attribute_type": "float", "float_value": 1.5},
        {"attribute_path": "sys/failed", "attribute_type": "bool", "bool_value": True},
        {
            "attribute_path": "train/loss",
            "attribute_type": "float_series",
            "step": Decimal("2"),
            "timestamp": _t(31),
            "float_value": 0.1,
        },
    ]
    pq.write_table(_rows(project, "RUN-2", run2), data / "RUN-2_part_0.parquet")
    model = [
        {"attribute_path": "sys/id", "attribute_type": "string", "string_value": "CLS-MOD"},
        {"attribute_path": "sys/name", "attribute_type": "string", "string_value": "classifier"},
        {"attribute_path": "sys/creation_time", "attribute_type": "datetime", "datetime_value": _t(40)},
        {"attribute_path": "owner_team", "attribute_type": "string", "string_value": "vision"},
    ]
    pq.write_table(_rows(project, "CLS-MOD", model), data / "models" / "CLS-MOD_part_0.parquet")
    for n, stage in ((1, "archived"), (2, "production")):
        vid = f"CLS-MOD-{n}"
        version = [
            {"attribute_path": "sys/id", "attribute_type": "string", "string_value": vid},
            {"attribute_path": "sys/model_id", "attribute_type": "string", "string_value": "CLS-MOD"},
            {"attribute_path": "sys/stage", "attribute_type": "string", "string_value": stage},
            {
                "attribute_path": "sys/creation_time",
                "attribute_type": "datetime",
                "datetime_value": _t(40 + n),
            },
            {"attribute_path": "validation/acc", "attribute_type": "float", "float_value": 0.9 + n / 100},
            {
                "attribute_path": "model/bin",
                "attribute_type": "file",
                "file_value": {"path": f"ws_exported/model_versions/{vid}/model/bin.pkl"},
            },
        ]
        pq.write_table(_rows(project, vid, version), data / "model_versions" / f"{vid}_part_0.parquet")
    return where
