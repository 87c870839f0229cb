"""Neptune, declared once, as a source only: its hosted service shut down on 2026-03-05,
so what is left is offline folders of either client (``neptune+offline://``) and the
Parquet its own exporter wrote (``neptune-exporter://``)."""

from __future__ import annotations

from typing import Any

from trackbridge.tracker import Capabilities, Target, Tracker

OFFLINE = "neptune+offline"
EXPORTER = "neptune-exporter"


def _open_source(t: Target, **options: Any) -> Any:
    if t.scheme == OFFLINE:
        from trackbridge.exporters.neptune.offline import NeptuneOfflineSource

        return NeptuneOfflineSource(t.inner, **options)
    from trackbridge.exporters.neptune.exporter import NeptuneExporterSource

    return NeptuneExporterSource(t.inner, **options)


TRACKER = Tracker(
    name="neptune",
    title="Neptune",
    schemes=(OFFLINE, EXPORTER),
    uris=(
        (
            "neptune+offline:///ABS/PATH",
            "a .neptune folder of neptune 1.x or neptune-scale (read only; add ?project=WS/NAME "
            "for 1.x runs, which lack it)",
        ),
        ("neptune-exporter:///ABS/PATH", "Parquet + files written by Neptune's exporter (read only)"),
    ),
    # Neptune keeps microseconds and fractional steps; nothing is ever written to it
    capabilities=Capabilities(local=True, writes=False),
    extra="neptune",
    open_source=_open_source,
    not_a_destination=(
        "Neptune is a source only: its hosted service shut down on 2026-03-05, "
        "so there is no Neptune to write to; migrate into mlflow+… or wandb+offline://…"
    ),
    order=30,
)
