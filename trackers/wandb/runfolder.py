"""A W&B run folder: how its name reads, and the run record at the top of its log.

Both the reader (which lists runs) and the offline writer (which must find the folders
of a run id before it writes one again) need these, so they live with the tracker.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trackbridge.errors import BadInputError
from trackbridge.trackers.wandb import common as wc
from trackbridge.trackers.wandb.leveldb import RecordLog

RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")


@dataclass
class RunHead:
    """What the run record at the top of a log says, read without the rest of the log."""

    log: Path
    project: str = ""
    run_id: str = ""
    entity: str = ""
    name: str | None = None
    start: float = 0.0
    sweep_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # ``_trackbridge`` if we wrote it
    error: str | None = None


def read_head(log: Path) -> RunHead:
    from wandb.proto import wandb_internal_pb2 as pb

    m = RUN_DIR.match(log.parent.name)
    h = RunHead(log, run_id=m.group(2) if m else log.stem.removeprefix("run-"))
    rec = pb.Record()
    try:
        for _, payload in RecordLog(log).payloads():
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "run":
                r = rec.run
                h.project, h.run_id, h.entity = r.project or "uncategorized", r.run_id or h.run_id, r.entity
                h.name = r.display_name or None
                h.start = r.start_time.seconds + r.start_time.nanos / 1e9
                h.sweep_id = r.sweep_id or None
                for it in r.config.update:
                    if it.key == wc.META_KEY or list(it.nested_key) == [wc.META_KEY]:
                        meta = json.loads(it.value_json)
                        h.meta = meta if isinstance(meta, dict) else {}
                return h
        h.error = f"{log}: no run record"
    except BadInputError as e:
        h.error = str(e)
    except Exception as e:
        h.error = f"{log}: {e}"
    return h
