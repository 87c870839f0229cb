"""The dual-logging shim's spool, declared like a tracker so that ``sync spool://PATH
DEST`` replays it anywhere. It is written only by ``trackbridge.init()``.

It lives with W&B because its runs are W&B-shaped: the shim gives them W&B's keys (so a
spooled run and the same run uploaded by ``wandb sync`` are one run everywhere), and its
reader (``trackbridge.exporters.wandb.spool``) uses W&B's identity and model rules."""

from __future__ import annotations

from typing import Any

from trackbridge.tracker import Capabilities, Target, Tracker


def _open_source(t: Target, **options: Any) -> Any:
    from trackbridge.exporters.wandb.spool import SpoolSource

    return SpoolSource(t.inner, **options)


TRACKER = Tracker(
    name="spool",
    title="trackbridge spool",
    schemes=("spool",),
    uris=(("spool:///ABS/PATH", "the dual-logging shim's spool (read only: replay it)"),),
    capabilities=Capabilities(local=True, writes=False),
    open_source=_open_source,
    not_a_destination="a spool is written by trackbridge.init() in training code, not by a copy",
    order=90,
)
