"""MLflow's own layout for step-wise images and tables, which its UI reads: both the
MLflow reader (turning them into neutral series rows a W&B user sees as ``wandb.Image``
and ``wandb.Table``) and the writer (putting another tracker's images where MLflow's
image card looks) follow it, so it is written down once, here.

``MlflowClient.log_image(image, key=, step=, timestamp=)`` writes
``images/<key, / as ~>+step+<step>+timestamp+<ms>+<uuid>.png`` and a ``+compressed.webp``
copy, and sets the tag ``mlflow.loggedImages``; MLflow before 3.x separated the parts
with ``%``. ``log_table`` writes a JSON file (``{"columns": …, "data": …}``) and lists it
in the tag ``mlflow.loggedArtifacts`` as ``{"path": …, "type": "table"}``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from trackbridge import schema

TAG_LOGGED_IMAGES = "mlflow.loggedImages"
TAG_LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"
IMAGE_KIND = "image-file"  # the neutral series kinds (W&B's names for the same things)
TABLE_KIND = "table-file"
_IMAGE = re.compile(
    r"^images/(?P<key>[^/]+?)[+%]step[+%](?P<step>-?\d+)[+%]timestamp[+%](?P<ms>\d+)[+%][0-9a-fA-F-]+\.png$"
)


def image_path(key: str, step: int, ms: int, uuid: str) -> str:
    """Where ``log_image(key=, step=, timestamp=)`` puts an image, without the extension."""
    return f"images/{key.replace('/', '~')}+step+{step}+timestamp+{ms}+{uuid}"


def parse_image(path: str) -> tuple[str, int, int] | None:
    """(key, step, ms) of a full-size image in ``log_image``'s layout; None for any other file."""
    m = _IMAGE.match(path)
    if m is None:
        return None
    return m.group("key").replace("~", "/").replace("#", "/"), int(m.group("step")), int(m.group("ms"))


def logged_tables(tag: str | None) -> list[str]:
    """The table files ``mlflow.loggedArtifacts`` lists (an unreadable tag lists none)."""
    try:
        listed = json.loads(tag) if tag else []
    except ValueError:
        return []
    return [
        str(x["path"])
        for x in listed
        if isinstance(listed, list) and isinstance(x, dict) and x.get("type") == "table" and x.get("path")
    ]


def series_rows(run_key: str, paths: list[str], tags: dict[str, str]) -> list[dict[str, Any]]:
    """The run's MLflow images (at their key and step) and tables (at step 0, keyed by
    their file's path without the extension) as neutral series rows."""
    from datetime import UTC, datetime

    out = []
    for path in paths:
        got = parse_image(path)
        if got is None:
            continue
        key, step, ms = got
        ts = datetime.fromtimestamp(ms / 1000, UTC)
        out.append(_row(run_key, key, step, ts, IMAGE_KIND, path, "log_image"))
    present = set(paths)
    for path in logged_tables(tags.get(TAG_LOGGED_ARTIFACTS)):
        if path in present:
            # log_table has neither step nor time: step 0, no time
            out.append(_row(run_key, path.rsplit(".", 1)[0], 0, None, TABLE_KIND, path, "log_table"))
    return out


def _row(run_key: str, key: str, step: int, ts: Any, kind: str, path: str, how: str) -> dict[str, Any]:
    return {
        "run_key": run_key,
        "key": key,
        "step": step,
        "timestamp": ts,
        "kind": kind,
        "value_json": schema.dumps_value({"mlflow": how, "path": path}),
        "file_path": path,
        "file_sha256": None,
    }


def derived(row: dict[str, Any]) -> bool:
    """A series row ``series_rows`` makes from the run's files and tags: an MLflow store
    need not keep it, its reader makes it again."""
    path = row.get("file_path") or ""
    how = "log_image" if row.get("kind") == IMAGE_KIND else "log_table"
    return row.get("value_json") == schema.dumps_value({"mlflow": how, "path": path})
