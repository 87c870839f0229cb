"""TensorBoard's events, decoded into one run's neutral tables.

Decoded with TensorBoard's own protobuf classes (the ``tensorboard`` package, which needs
no TensorFlow). What each summary is, TensorBoard decides from its plugin name, and so
does this: scalars (``simple_value``, or a scalar tensor of the scalars plugin) become
metric points; the hparams plugin's session becomes typed params and its metric
definitions a tag; text becomes ``string`` series entries; images become ``image-file``
series entries with their PNG bytes among the run's files; histograms (``histo``, or the
histograms plugin's ``[k, 3]`` tensor) become ``histogram`` series entries in W&B's shape
with TensorBoard's own statistics beside it. Anything else is counted and reported.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from trackbridge import schema

# TensorFlow's DataType enum values, for the tensors a summary holds
_DT_FLOAT, _DT_DOUBLE, _DT_HALF = 1, 2, 19
_NUMPY = {1: "<f4", 2: "<f8", 19: "<f2", 3: "<i4", 9: "<i8"}


@dataclass
class Image:
    key: str
    step: int
    ts_us: int
    data: bytes
    width: int
    height: int
    index: int = 0


@dataclass
class Events:
    """What one run's event files held, gathered in file order."""

    chunks: list[pa.Table] = field(default_factory=list)  # points: key, step, ts (µs), value, seq
    series: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    hparam_metrics: list[str] = field(default_factory=list)
    file_version: str | None = None
    first_us: int | None = None
    last_us: int | None = None
    seen: int = 0  # records read so far: a point's place, for ties
    skipped: Counter[str] = field(default_factory=Counter)
    # points decoded one event at a time, flushed into ``chunks`` after each file
    keys: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)

    def saw(self, lo: int, hi: int) -> None:
        self.first_us = lo if self.first_us is None else min(self.first_us, lo)
        self.last_us = hi if self.last_us is None else max(self.last_us, hi)

    def _flush(self) -> None:
        if self.keys:
            self.chunks.append(
                pa.table(
                    {
                        "key": pa.array(self.keys, pa.string()),
                        "step": pa.array(self.steps, pa.int64()),
                        "ts": pa.array(self.times, pa.int64()),
                        "value": pa.array(self.values, pa.float64()),
                        "seq": pa.array(self.seqs, pa.int64()),
                    }
                )
            )
        for lst in (self.keys, self.steps, self.times, self.values, self.seqs):
            lst.clear()

    def metrics(self, run_key: str) -> pa.Table:
        """The points in the neutral table, sorted by key, step and time (ties in the
        order they were written)."""
        self._flush()
        if not self.chunks:
            return schema.empty("metrics")
        pts = pa.concat_tables(self.chunks).sort_by(
            [("key", "ascending"), ("step", "ascending"), ("ts", "ascending"), ("seq", "ascending")]
        )
        n = pts.num_rows
        tbl = pa.table(
            {
                "run_key": pa.array([run_key] * n, pa.string()),
                "key": pts.column("key"),
                "step": pts.column("step"),
                "timestamp": pts.column("ts").cast(pa.timestamp("us", tz="UTC")),
                "value": pts.column("value"),
                "model_key": pa.nulls(n, pa.string()),
                "dataset_name": pa.nulls(n, pa.string()),
                "dataset_digest": pa.nulls(n, pa.string()),
            }
        )
        return tbl.cast(schema.SCHEMAS["metrics"])


def _classes() -> tuple[Any, Any]:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    return Event, HParamsPluginData


def read_events(records: Any, into: Events) -> None:
    """Decode one file's records into ``into``; called for each file of a run in order.
    Plain scalar events are decoded together (``scalars``), every other event by
    TensorBoard's protobuf classes."""
    from trackbridge.exporters.tensorboard import scalars

    base = into.seen
    into.seen += len(records)
    fast = scalars.decode(records)
    if len(fast.index):
        into.chunks.append(
            pa.table(
                {
                    "key": fast.keys,
                    "step": pa.array(fast.steps, pa.int64()),
                    "ts": pa.array(fast.times_us, pa.int64()),
                    "value": pa.array(fast.values.astype(np.float64), pa.float64()),
                    "seq": pa.array(fast.index + base, pa.int64()),
                }
            )
        )
        into.saw(int(fast.times_us.min()), int(fast.times_us.max()))
    rest = np.ones(len(records), dtype=bool)
    rest[fast.index] = False
    event_class, hparams_class = _classes()
    parse = event_class.FromString
    keys, steps, times, values, seqs = into.keys, into.steps, into.times, into.values, into.seqs
    for i in np.flatnonzero(rest).tolist():
        ev = parse(records.record(i))
        ts = int(ev.wall_time * 1_000_000)
        into.saw(ts, ts)
        what = ev.WhichOneof("what")
        if what == "summary":
            step = ev.step
            for v in ev.summary.value:
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    keys.append(v.tag)
                    steps.append(step)
                    times.append(ts)
                    values.append(v.simple_value)
                    seqs.append(base + i)
                else:
                    _other(into, v, kind, step, ts, hparams_class, base + i)
        elif what == "file_version":
            into.file_version = into.file_version or ev.file_version
        elif what is not None:
            into.skipped[what] += 1  # a graph, a session log, run metadata: not tracking data
    into._flush()


def _other(into: Events, v: Any, kind: str | None, step: int, ts: int, hparams_class: Any, seq: int) -> None:
    plugin = v.metadata.plugin_data.plugin_name if v.HasField("metadata") else ""
    if plugin == "hparams":
        _hparams(into, hparams_class.FromString(v.metadata.plugin_data.content))
    elif kind == "tensor":
        _tensor(into, v.tag, plugin, v.tensor, step, ts, seq)
    elif kind == "image":
        im = v.image
        into.images.append(Image(v.tag, step, ts, im.encoded_image_string, im.width, im.height))
    elif kind == "histo":
        h = v.histo
        into.series.append(_row(v.tag, step, ts, "histogram", _histo_value(h)))
    else:
        into.skipped[f"{plugin or kind or 'empty'} summaries"] += 1


def _tensor(into: Events, tag: str, plugin: str, t: Any, step: int, ts: int, seq: int) -> None:
    if plugin in ("scalars", "") and not t.tensor_shape.dim and t.dtype in _NUMPY:
        into.keys.append(tag)
        into.steps.append(step)
        into.times.append(ts)
        into.values.append(float(_array(t)[0]))
        into.seqs.append(seq)
    elif plugin == "text":
        texts = [s.decode("utf-8", "replace") for s in t.string_val]
        shape = [d.size for d in t.tensor_shape.dim]
        if len(texts) == 1:  # a scalar, or the one-element vector PyTorch writes
            into.series.append(_row(tag, step, ts, "string", texts[0]))
        else:  # a table of strings, as TensorBoard shows it: a list, or a list of rows
            value: Any = texts
            if len(shape) == 2 and shape[0] * shape[1] == len(texts):
                value = [texts[i * shape[1] : (i + 1) * shape[1]] for i in range(shape[0])]
            into.series.append(_row(tag, step, ts, "json", value))
    elif plugin == "images" and len(t.string_val) >= 2:
        width, height = (int(x) for x in t.string_val[:2])
        for i, data in enumerate(t.string_val[2:]):
            into.images.append(Image(tag, step, ts, data, width, height, i))
    elif plugin == "histograms" and t.dtype in _NUMPY:
        arr = _array(t).reshape(-1, 3) if len(t.tensor_shape.dim) == 2 else None
        if arr is None or not len(arr):
            into.skipped["empty histograms"] += 1
            return
        value = {
            "_type": "histogram",
            "bins": [float(arr[0][0]), *(float(r) for r in arr[:, 1])],
            "values": [_whole(float(c)) for c in arr[:, 2]],
        }
        into.series.append(_row(tag, step, ts, "histogram", value))
    else:
        into.skipped[f"{plugin or 'tensor'} summaries"] += 1


def _array(t: Any) -> Any:
    """A tensor's values as numpy: from its packed bytes, else its typed value list."""

    dtype = _NUMPY[t.dtype]
    if t.tensor_content:
        return np.frombuffer(t.tensor_content, dtype=dtype)
    if t.dtype == _DT_FLOAT:
        vals = t.float_val
    elif t.dtype == _DT_DOUBLE:
        vals = t.double_val
    elif t.dtype == _DT_HALF:
        return np.array(t.half_val, dtype=np.uint16).view(np.float16)
    elif dtype == "<i8":
        vals = t.int64_val
    else:
        vals = t.int_val
    size = 1
    for d in t.tensor_shape.dim:
        size *= d.size
    arr = np.array(vals, dtype=dtype)
    return np.resize(arr, size) if len(arr) == 1 and size > 1 else arr  # one value, repeated


def _histo_value(h: Any) -> dict[str, Any]:
    """W&B's histogram shape (edges and counts), which the importers draw, with
    TensorBoard's own statistics beside it: its buckets' right edges are ``bins[1:]``."""
    limits = list(h.bucket_limit)
    left = min(h.min, limits[0]) if limits else h.min
    return {
        "_type": "histogram",
        "bins": [left, *limits],
        "values": [_whole(c) for c in h.bucket],
        "min": h.min,
        "max": h.max,
        "num": _whole(h.num),
        "sum": h.sum,
        "sum_squares": h.sum_squares,
    }


def _whole(x: float) -> float | int:
    """A count TensorBoard keeps as a double, as the whole number it is (JSON readers,
    W&B's included, write ``3.0`` back as ``3``)."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


def _row(tag: str, step: int, ts: int, kind: str, value: Any, file_path: str | None = None,
         sha: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "key": tag,
        "step": step,
        "timestamp": ts,
        "kind": kind,
        "value_json": schema.dumps_value(value),
        "file_path": file_path,
        "file_sha256": sha,
    }


def _hparams(into: Events, data: Any) -> None:
    """The session's hyperparameters, typed as TensorBoard keeps them (a number is a
    double there: a whole one comes back as an int, as it was most likely logged)."""
    which = data.WhichOneof("data")
    if which == "session_start_info":
        for name, value in data.session_start_info.hparams.items():
            kind = value.WhichOneof("kind")
            if kind == "number_value":
                n = value.number_value
                into.hparams[name] = int(n) if n.is_integer() and abs(n) < 2**53 else n
            elif kind == "string_value":
                into.hparams[name] = value.string_value
            elif kind == "bool_value":
                into.hparams[name] = value.bool_value
            else:
                into.hparams[name] = None
    elif which == "experiment":
        for info in data.experiment.metric_infos:
            tag = info.name.tag
            if tag and tag not in into.hparam_metrics:
                into.hparam_metrics.append(tag)


def image_rows(images: list[Image]) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """Series entries for the images, and their bytes by path among the run's files."""
    rows, files = [], {}
    for im in images:
        ext = _image_ext(im.data)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", im.key).strip(".") or "_"  # a tag is untrusted text
        suffix = f"_{im.index}" if im.index else ""
        sha = hashlib.sha256(im.data).hexdigest()
        path = f"media/images/{safe}_{im.step}{suffix}_{sha[:20]}.{ext}"
        value = {"_type": "image-file", "path": path, "sha256": sha, "size": len(im.data),
                 "width": im.width, "height": im.height, "format": ext}  # fmt: skip
        rows.append(_row(im.key, im.step, im.ts_us, "image-file", value, path, sha))
        files[path] = im.data
    return rows, files


def _image_ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return "bin"


def hparams_params(run_key: str, hparams: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "run_key": run_key,
            "path": [name],
            "value_json": schema.dumps_value(value),
            "value_type": schema.value_type(value),
        }
        for name, value in sorted(hparams.items())
    ]
