"""Weights & Biases, declared once: online (``wandb://``, through ``wandb.Api``) and
offline run folders (``wandb+offline://``, the ``.wandb`` files ``wandb sync`` uploads).

Its readers are in ``trackbridge.exporters.wandb``, its writers in
``trackbridge.importers.wandb``; what both share is in this package (identity and
config conventions in ``common``, the record log in ``leveldb``, run folders in
``runfolder``, the online API in ``api``). Importing this module does not import
``wandb``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from trackbridge.tracker import Capabilities, Limits, Target, Tracker, local_path
from trackbridge.uri import folder_canonical, folder_destination

OFFLINE = "wandb+offline"
ONLINE = "wandb"


def _parse(scheme: str, rest: str, raw: str) -> str:
    return local_path(rest) if scheme == OFFLINE else rest


def _open_source(t: Target, **options: Any) -> Any:
    if t.scheme == OFFLINE:
        from trackbridge.exporters.wandb.offline import WandbOfflineSource

        return WandbOfflineSource(t.inner, **options)
    from trackbridge.exporters.wandb.online import WandbOnlineSource

    return WandbOnlineSource(t.inner, **options)


def _open_sink(t: Target, **options: Any) -> Any:
    if t.scheme == OFFLINE:
        from trackbridge.importers.wandb.offline import WandbOfflineSink

        return WandbOfflineSink(t.inner, **options)
    from trackbridge.importers.wandb.online import WandbOnlineSink

    return WandbOnlineSink(t.inner, **options)


def _check_destination(t: Target) -> None:
    if t.scheme == OFFLINE:
        folder_destination(t)


def _canonical(t: Target) -> str:
    if t.scheme == OFFLINE:
        return folder_canonical(t)
    return "wandb://" + "/".join(p for p in t.inner.split("?")[0].split("/") if p)


def _system_metric(key: str) -> str | None:
    from trackbridge.trackers.wandb.system import neutral_name

    return neutral_name(key)


def _demo(root: Path, say: Callable[[str], None]) -> str:
    from trackbridge.trackers.wandb.demo import make_wandb_demo

    demo = root / "wandb-demo"
    if not (demo / "wandb").is_dir():
        say(f"writing demo W&B offline runs with the wandb SDK: {demo}")
        make_wandb_demo(demo)
    else:
        say(f"reusing the demo W&B offline runs in {demo}")
    return f"{OFFLINE}://{demo / 'wandb'}"


TRACKER = Tracker(
    name="wandb",
    title="Weights & Biases",
    schemes=(OFFLINE, ONLINE),
    uris=(
        ("wandb+offline:///ABS/PATH", "W&B offline run folders (read, or written for wandb sync)"),
        (
            "wandb://ENTITY[/PROJECT]",
            "W&B online (WANDB_API_KEY from the environment); with no PROJECT, every project of ENTITY",
        ),
    ),
    # W&B keeps times to the microsecond, but steps must be whole and only ever grow
    capabilities=Capabilities(
        time_precision_ms=1, limits=Limits(integer_steps=True, monotonic_steps=True, tag_value_chars=64)
    ),
    extra="wandb",
    parse=_parse,
    open_source=_open_source,
    open_sink=_open_sink,
    check_destination=_check_destination,
    canonical=_canonical,
    in_process=lambda t: t.scheme == OFFLINE,
    system_metric=_system_metric,
    # W&B's clock since the run started, in every history row
    bookkeeping_metrics=("_runtime",),
    # a trackbridge process runs its own W&B service: attached to a parent's, a killed
    # import would leave its runs open there, and the next one fail with "run ID in use"
    process_env=(("WANDB_SERVICE", None),),
    demo=_demo,
    scratch=lambda folder: f"{OFFLINE}://{folder / 'wandb-runs'}",
    order=20,
)
