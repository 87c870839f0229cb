"""The native-landing rules every writer shares (``trackbridge.native``), and the W&B
system-metric vocabulary, on their own: fast, and able to fail on one wrong name."""

from __future__ import annotations

import math

from trackbridge import native, schema
from trackbridge.tracker import by_name


def _summary(**values: object) -> object:
    rows = []
    for k, v in values.items():
        path = k.split("__")  # a__b stands for a nested summary {"a": {"b": ...}}
        rows.append({"run_key": "k", "path": path, "value_json": schema.dumps_value(v)})
    return schema.table("summary", rows)


def test_a_summary_shows_what_the_history_does_not() -> None:
    s = _summary(
        best=0.87,  # only in the summary
        loss=0.25,  # differs from the history's last point
        acc=0.9,  # equals the history's last point
        note="converged",
        flag=True,
        long="x" * (native.SUMMARY_TEXT_CHARS + 1),
        val__loss__min=0.2,  # define_metric(summary="min")
        media={"_type": "image-file", "path": "media/images/a.png"},
        _runtime=12.5,  # the tracker's own
    )
    view = native.summary_view(s, {"loss": 0.3, "acc": 0.9}, {"loss", "acc"})
    assert view.metrics == {"best": 0.87, "summary/loss": 0.25, "val.loss.min": 0.2}
    assert view.texts == {"note": "converged", "flag": "true"}


def test_nan_and_infinities_compare_as_a_runs_table_shows_them() -> None:
    assert native.same(math.nan, math.nan) and not native.same(math.nan, 1.0)
    assert native.same(math.inf, 1.7976931348623157e308) and not native.same(-math.inf, math.inf)


def test_wandb_system_metrics_get_mlflows_names_only_where_meaning_and_unit_match() -> None:
    wandb, mlflow = by_name("wandb"), by_name("mlflow")
    names = {
        k: native.system_metric_key(wandb, k, mlflow)
        for k in (
            "system/cpu",
            "system/memory_percent",
            "system/gpu.1.gpu",
            "system/gpu.0.powerWatts",
            "system/disk./.usageGB",
            "system/network.sent",
            "system/gpu.0.temp",
            "system/some.newKey",
            "train/loss",
        )
    }
    assert names == {
        "system/cpu": "system/cpu_utilization_percentage",
        "system/memory_percent": "system/system_memory_usage_percentage",
        "system/gpu.1.gpu": "system/gpu_1_utilization_percentage",
        "system/gpu.0.powerWatts": "system/gpu_0_power_usage_watts",
        "system/disk./.usageGB": "system/disk_usage_gigabytes",  # MLflow's is megabytes
        "system/network.sent": "system/network_transmit_bytes",  # MLflow's is megabytes
        "system/gpu.0.temp": "system/gpu_0_temperature_celsius",
        "system/some.newKey": "system/some_new_key",
        "train/loss": None,
    }
    # a tracker's own names are already native; MLflow → MLflow renames nothing
    assert native.system_metric_key(mlflow, "system/cpu_utilization_percentage", mlflow) is None
    assert wandb.bookkeeping_metrics == ("_runtime",) and mlflow.bookkeeping_metrics == ()


def test_a_models_metadata_becomes_params_mlflow_accepts() -> None:
    """W&B metadata keys are free text; a logged model's params must fit MLflow's key rules,
    or the run would fail. The exact metadata stays in the artifact row."""
    import json

    from trackbridge.importers.mlflow.models import as_logged_model
    from trackbridge.model import ArtifactPayload

    meta = {"arch(v2)": "r18", "depth": 18, "_internal": 1, "nested": {"a": 1}, "long": "x" * 7000}
    art = ArtifactPayload(row={"type": "model", "version": None, "metadata_json": json.dumps(meta)})
    got = json.loads(as_logged_model(art).row["metadata_json"])
    assert got["model_type"] == "model"
    assert got["params"] == {"arch_v2_": "r18", "depth": "18", "long": "x" * 6000}
