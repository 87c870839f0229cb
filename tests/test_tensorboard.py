"""TensorBoard event files as a source (issue 18): logs written at test time by a real
writer (PyTorch's ``SummaryWriter``), read back from the destination with MLflow's and
W&B's own readers and compared with what TensorBoard's own ``EventFileLoader`` reads
from the same files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from trackbridge.errors import BadInputError
from trackbridge.trackers.mlflow import common as mc
from trackbridge.trackers.tensorboard.demo import make_tensorboard_demo
from trackbridge.trackers.tensorboard.tfrecord import masked, read_records

from tests.conftest import one_line, run_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tensorboard_demo(tmp_path_factory.mktemp("tb") / "logs")


@pytest.fixture
def logs(demo: Path, tmp_path: Path) -> Path:
    """A copy of the demo a test may change."""
    return Path(shutil.copytree(demo, tmp_path / "logs"))


def tensorboard_reads(folder: Path) -> tuple[dict[tuple[str, int], list[float]], list[float]]:
    """What TensorBoard's own loader reads from a run folder: scalar points by (tag,
    step), every value in file order, and the events' wall times."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    points: dict[tuple[str, int], list[float]] = {}
    times = []
    for f in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[-1])):
        for ev in EventFileLoader(str(f)).Load():
            times.append(ev.wall_time)
            for v in ev.summary.value:  # the loader hands scalars over as its plugin's tensors
                if v.metadata.plugin_data.plugin_name == "scalars":
                    value = float(tensor_util.make_ndarray(v.tensor).item())
                    points.setdefault((v.tag, ev.step), []).append(value)
    return points, times


def mlflow_runs(url: str) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(url)
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_name: r for r in client.search_runs(exps)}


def mlflow_points(url: str, run: mlflow.entities.Run) -> dict[tuple[str, int], list[float]]:
    client = mlflow.MlflowClient(url)
    out: dict[tuple[str, int], list[float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            out.setdefault((key, m.step), []).append(m.value)
    return out


def test_tensorboard_logs_land_in_mlflow_as_tensorboard_shows_them(demo, tmp_path):
    """Every scalar TensorBoard reads, at its step, the restart's file included; the
    hparams as params; the image in MLflow's image view; the text and the histogram kept;
    the run's times from its events; a second migration adds nothing."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    p = run_cli("migrate", f"tensorboard://{demo}", f"mlflow+{url}")
    assert "verify: identical" in p.stdout and "3 new" in p.stdout, p.stdout
    runs = mlflow_runs(url)
    assert set(runs) == {"logs", "train/a", "train/b"}
    for name, folder in (
        ("train/a", demo / "train" / "a"),
        ("train/b", demo / "train" / "b"),
        ("logs", demo),
    ):
        want, times = tensorboard_reads(folder)
        got = mlflow_points(url, runs[name])
        assert got == {k: sorted(v) for k, v in want.items()}, name
        assert runs[name].info.start_time == int(min(times) * 1000)
    a, b = runs["train/a"], runs["train/b"]
    assert sorted(s for k, s in mlflow_points(url, a) if k == "loss") == list(range(60))
    assert b.data.params == {"lr": "0.01", "batch_size": "32", "optimizer": "adam", "dropout": "1"}
    assert b.data.tags["tensorboard.hparams.metrics"] == '["hparam/accuracy"]'
    assert a.data.tags["mlflow.loggedImages"] == "True"
    client = mlflow.MlflowClient(url)
    assert [f.path for f in client.list_artifacts(a.info.run_id, "images")]  # MLflow's image view
    series = pq.read_table(client.download_artifacts(a.info.run_id, mc.SERIES_ARTIFACT, str(tmp_path)))
    kinds = {r["key"]: r["kind"] for r in series.to_pylist()}
    assert kinds["notes/text_summary"] == "string" and kinds["weights"] == "histogram"
    text = next(r for r in series.to_pylist() if r["key"] == "notes/text_summary")
    assert text["value_json"] == '"first *epoch* done"' and text["step"] == 10
    assert a.data.tags["tensorboard.file_version"] == "brain.Event:2"

    again = run_cli("migrate", f"tensorboard://{demo}", f"mlflow+{url}")
    assert "0 new" in again.stdout and "3 unchanged" in again.stdout, again.stdout
    assert "metric points written: 0" in again.stdout


def test_tensorboard_logs_into_wandb_offline_verify(demo, tmp_path):
    p = run_cli("migrate", f"tensorboard://{demo}", f"wandb+offline://{tmp_path / 'wandb'}")
    assert "verify: identical" in p.stdout and "3 new" in p.stdout, p.stdout


def test_a_cut_off_file_moves_its_whole_records_and_a_corrupt_one_fails_only_its_run(logs, tmp_path):
    a_files = sorted((logs / "train" / "a").glob("events.*"), key=lambda p: int(p.name.split(".")[-1]))
    cut = a_files[-1]
    cut.write_bytes(cut.read_bytes()[:-7])  # the restart's job killed while writing
    bad = next((logs / "train" / "b").glob("events.*"))
    data = bytearray(bad.read_bytes())
    records = read_records(bad)
    start = data.find(records.record(2))  # a record in the middle: its data flipped
    data[start + 3] ^= 0x01
    bad.write_bytes(bytes(data))
    url = f"sqlite:///{tmp_path / 'd.db'}"
    p = run_cli("import", f"tensorboard://{logs}", f"mlflow+{url}", check=1)
    assert "2 new" in p.stdout and "1 failed" in p.stdout, p.stdout
    line = one_line(p.stderr)
    assert str(bad) in line and f"byte {start - 12}: record checksum mismatch" in line
    runs = mlflow_runs(url)
    assert set(runs) == {"logs", "train/a"}
    assert runs["train/a"].data.tags[mc.TAG_INCOMPLETE] == "true"
    want, _ = tensorboard_reads(logs / "train" / "a")  # TensorBoard stops at the cut too
    assert mlflow_points(url, runs["train/a"]) == {k: sorted(v) for k, v in want.items()}


def test_a_sync_picks_up_the_points_of_a_growing_run(logs, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    url = f"sqlite:///{tmp_path / 'd.db'}"
    state = ["--state-dir", str(tmp_path / "state")]
    first = run_cli("sync", f"tensorboard://{logs}", f"mlflow+{url}", *state)
    assert "3 new" in first.stdout, first.stdout
    with SummaryWriter(str(logs / "train" / "a")) as w:  # the job goes on: a new file
        for step in range(60, 70):
            w.add_scalar("loss", 1.0 / (step + 1), step)
    second = run_cli("sync", f"tensorboard://{logs}", f"mlflow+{url}", *state)
    assert "1 updated" in second.stdout and "2 unchanged" in second.stdout, second.stdout
    assert "metric points written: 10" in second.stdout
    runs = mlflow_runs(url)
    want, _ = tensorboard_reads(logs / "train" / "a")
    assert mlflow_points(url, runs["train/a"]) == {k: sorted(v) for k, v in want.items()}
    third = run_cli("sync", f"tensorboard://{logs}", f"mlflow+{url}", *state)
    assert "3 unchanged" in third.stdout, third.stdout


def _record(data: bytes) -> bytes:
    import google_crc32c

    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked(google_crc32c.value(length)))
        + data
        + struct.pack("<I", masked(google_crc32c.value(data)))
    )


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (lambda b: b[:-1], ("truncated", 2)),  # the last record's data CRC cut
        (lambda b: b[: len(b) - 20], ("truncated", 2)),  # inside the last record's data
        (lambda b: b + b"\x01\x02", ("truncated", 3)),  # a header begun
        (lambda b: b[:8] + b"\x00" + b[9:], ("error", "byte 0: record length checksum mismatch")),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], ("error", "byte 26: record checksum mismatch")),
    ],
    ids=["cut-crc", "cut-data", "cut-header", "bad-length-crc", "bad-data-crc"],
)
def test_tfrecord_framing_is_checked(tmp_path, damage, expect):
    """The framing's rules, byte by byte, on records made by the format's own recipe."""
    whole = _record(b"x" * 10) + _record(b"y" * 11) + _record(b"z" * 30)
    f = tmp_path / "events.out.tfevents.1.host"
    f.write_bytes(whole)
    assert [bytes(r) for r in read_records(f)] == [b"x" * 10, b"y" * 11, b"z" * 30]
    f.write_bytes(damage(whole))
    if expect[0] == "truncated":
        got = read_records(f)
        assert got.truncated_at is not None and len(got) == expect[1]
    else:
        with pytest.raises(BadInputError, match=expect[1]):
            read_records(f)


_tags = st.one_of(st.sampled_from(["loss", "metric/0", "", "é/λ", "x" * 120]), st.text(max_size=140))
_values = st.floats(width=32, allow_nan=True, allow_infinity=True)
_steps = st.one_of(
    st.sampled_from([0, 1, 127, 128, 2**31, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1)
)
_walls = st.one_of(st.sampled_from([0.0, 1_700_000_000.123456, -1.5]), st.floats(0, 4e9))


@st.composite
def _events(draw: st.DrawFn) -> list:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    out = []
    for _ in range(draw(st.integers(1, 12))):
        ev = Event(wall_time=draw(_walls), step=draw(_steps))
        kind = draw(st.sampled_from(["scalar", "scalar", "scalar", "two", "metadata", "version"]))
        if kind == "version":
            ev.file_version = "brain.Event:2"
        else:
            for _ in range(2 if kind == "two" else 1):
                v = Summary.Value(tag=draw(_tags), simple_value=draw(_values))
                if kind == "metadata":
                    v.metadata.display_name = "shown"
                ev.summary.value.append(v)
        out.append(ev)
    return out


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.binary(min_size=3, max_size=3), min_size=1, max_size=40),
    hashing=st.sampled_from(["fnv", "all-collide", "first-byte"]),
)
def test_distinct_tags_are_found_even_when_their_hashes_collide(rows, hashing):
    """Tags are grouped by a 64-bit hash of their bytes, each row then checked against
    its group's; rows that share a hash (forced here: no two real tags are known to)
    fall back to sorting the rows themselves, with the same answer."""
    from trackbridge.exporters.tensorboard.scalars import _distinct, _fnv

    hashed = {
        "fnv": _fnv,
        "all-collide": lambda t: np.zeros(len(t), np.uint64),
        "first-byte": lambda t: t[:, 0].astype(np.uint64),
    }[hashing]
    tags = np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), 3)
    uniq, inverse = _distinct(tags, hashed)
    assert sorted(uniq) == sorted(set(rows))  # each distinct row once
    assert [uniq[i] for i in inverse] == rows  # and each row's place among them


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=_events())
def test_scalars_decoded_together_are_what_protobuf_decodes(events, tmp_path):
    """The column decoder against TensorBoard's protobuf classes, event by event, on
    events the classes themselves encoded: steps absent (0), negative and 10-byte,
    tags empty, long or not ASCII, NaN and infinities, two values or metadata in one
    event (which it leaves to protobuf)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from trackbridge.exporters.tensorboard import events as ev

    f = tmp_path / f"events.out.tfevents.{len(events)}.h"
    f.write_bytes(b"".join(_record(e.SerializeToString()) for e in events))
    got = ev.Events()
    ev.read_events(read_records(f), got)
    table = got.metrics("r").to_pylist()
    want = []
    for i, data in enumerate(read_records(f)):
        e = Event.FromString(data)
        for v in e.summary.value:
            want.append((v.tag, e.step, int(e.wall_time * 1_000_000), v.simple_value, i))
    want.sort(key=lambda w: (w[0], w[1], w[2], w[4]))

    def same(x: float) -> object:
        return "nan" if x != x else x

    assert [(r["key"], r["step"], r["timestamp"], same(r["value"])) for r in table] == [
        (k, s, schema_ts(t), same(v)) for k, s, t, v, _ in want
    ]


def schema_ts(us: int):
    from trackbridge import schema

    return schema.us_to_dt(us)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.binary(min_size=5, max_size=5), min_size=1, max_size=20), extra=st.binary(max_size=80)
)
def test_checksums_by_columns_are_crc32c(rows, extra):
    """The column-wise CRC-32C (many short records at once) is Google's CRC-32C."""
    import google_crc32c
    import numpy as np
    from trackbridge.trackers.tensorboard.tfrecord import crc_columns

    for width_rows in (rows, [r + extra for r in rows]):
        mat = np.frombuffer(b"".join(width_rows), dtype=np.uint8).reshape(len(width_rows), -1)
        assert crc_columns(mat).tolist() == [google_crc32c.value(r) for r in width_rows]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    runs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 70)), min_size=1, max_size=12),
    cut=st.integers(0, 30),
)
@example(runs=[(0, 1)], cut=17)  # cut to less than one header
def test_records_are_found_however_their_lengths_repeat(runs, cut, tmp_path):
    """Runs of equal lengths (taken many at once) and lengths that change every record
    (taken one by one) give the records a plain walk gives, the last one cut or not."""
    datas = [bytes([i % 251]) * n for i, (n, times) in enumerate(runs) for _ in range(times)]
    whole = b"".join(_record(d) for d in datas)
    f = tmp_path / "events.out.tfevents.9.h"
    size = max(len(whole) - cut, 0)
    f.write_bytes(whole[:size])
    got = read_records(f)
    ends = [sum(len(x) + 16 for x in datas[: i + 1]) for i in range(len(datas))]
    assert list(got) == [d for d, end in zip(datas, ends, strict=True) if end <= size]
    assert (got.truncated_at is None) == (size in (0, *ends))


def test_tensor_summaries_as_tensorflow_2_writes_them(tmp_path):
    """TensorFlow 2's summaries are tensors with a plugin name (``tf.summary.scalar``,
    ``histogram``, ``text``), written here by TensorBoard's own writer and summary
    functions (no TensorFlow): scalars become points, the histogram's ``[k, 3]`` tensor
    W&B's edges and counts, the text a string, as TensorBoard's loader reads them."""
    import numpy as np
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.histogram.summary_v2 import histogram_pb
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb
    from tensorboard.plugins.text.summary_v2 import text_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    logs = tmp_path / "tf2" / "run"
    writer = EventFileWriter(str(logs))
    for step in range(5):
        writer.add_event(
            Event(
                wall_time=1_700_000_000 + step, step=step, summary=scalar_pb("epoch_loss", 1.0 / (step + 1))
            )
        )
    writer.add_event(
        Event(
            wall_time=1_700_000_010, step=4, summary=histogram_pb("dense/kernel", np.arange(10.0), buckets=3)
        )
    )
    writer.add_event(Event(wall_time=1_700_000_011, step=4, summary=text_pb("notes", "done")))
    writer.close()
    url = f"sqlite:///{tmp_path / 'd.db'}"
    p = run_cli("migrate", f"tensorboard://{tmp_path / 'tf2'}", f"mlflow+{url}")
    assert "verify: identical" in p.stdout, p.stdout
    (run,) = mlflow_runs(url).values()
    # TensorFlow's scalars are 32-bit floats: carried exactly as the file holds them
    assert mlflow_points(url, run) == {
        ("epoch_loss", s): [float(np.float32(1.0 / (s + 1)))] for s in range(5)
    }
    client = mlflow.MlflowClient(url)
    series = pq.read_table(
        client.download_artifacts(run.info.run_id, mc.SERIES_ARTIFACT, str(tmp_path))
    ).to_pylist()
    by_key = {r["key"]: r for r in series}
    assert by_key["notes"]["kind"] == "string" and by_key["notes"]["value_json"] == '"done"'
    hist = json.loads(by_key["dense/kernel"]["value_json"])
    (ev,) = [e for e in _loader_events(logs) if e.summary.value and e.summary.value[0].tag == "dense/kernel"]
    buckets = tensor_util.make_ndarray(ev.summary.value[0].tensor)  # (left, right, count) rows
    assert hist["bins"] == [buckets[0][0], *buckets[:, 1]] and hist["values"] == [
        int(c) for c in buckets[:, 2]
    ]


def _loader_events(folder: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e for f in sorted(folder.glob("events.out.tfevents.*")) for e in EventFileLoader(str(f)).Load()]
