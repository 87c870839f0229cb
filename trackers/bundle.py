"""The bundle, trackbridge's own folder format, declared like a tracker: any source can
be exported into one and any destination imported from one. A plain path is a bundle."""

from __future__ import annotations

import os
from typing import Any

from trackbridge.tracker import Capabilities, Target, Tracker
from trackbridge.uri import folder_destination


def _open_source(t: Target, **options: Any) -> Any:
    from trackbridge.bundle_reader import BundleSource

    return BundleSource(t.inner, **options)


def _open_sink(t: Target, **options: Any) -> Any:
    from trackbridge.bundle import BundleWriter

    return BundleWriter(t.inner, **options)


TRACKER = Tracker(
    name="bundle",
    title="trackbridge bundle",
    schemes=("bundle",),
    uris=(("PATH or bundle:///PATH", "a trackbridge bundle folder (Parquet + blobs + manifest)"),),
    # Parquet keeps microseconds; a bundle holds whatever the neutral schema holds
    capabilities=Capabilities(local=True, rewrites_history=True),
    parse=lambda scheme, rest, raw: rest,
    open_source=_open_source,
    open_sink=_open_sink,
    check_destination=folder_destination,
    canonical=lambda t: f"bundle://{os.path.realpath(t.inner)}",
    scratch=lambda folder: f"bundle://{folder / 'bundle'}",
    order=80,
)
