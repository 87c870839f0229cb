"""A run's fields where an MLflow user looks for them (``trackbridge.native``): summary
values as metrics and tags of the runs table, images in MLflow's image card at their
step, tables in its table view, histograms drawn as images at their step.

Everything added here is recorded in the run's ``trackbridge/extras.json`` (``native``),
and the MLflow exporter takes it back out, so a round trip is exact; the exact data
stays in the private files as before.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from trackbridge import native, schema
from trackbridge.errors import first_line
from trackbridge.files import temp_dir
from trackbridge.fit import fit_key
from trackbridge.importers.mlflow.files import upload_one
from trackbridge.model import FileRef, RunPayload
from trackbridge.report import RunReport
from trackbridge.trackers.mlflow import LIMITS, media
from trackbridge.trackers.mlflow import common as mc

# MLflow's own tags that make its UI show images and tables (mlflow.utils.mlflow_tags)
TAG_LOGGED_IMAGES = media.TAG_LOGGED_IMAGES
TAG_LOGGED_ARTIFACTS = media.TAG_LOGGED_ARTIFACTS
IMAGE_KINDS = (media.IMAGE_KIND,)
TABLE_KINDS = (media.TABLE_KIND,)
# A histogram logged at every step would be thousands of pictures: this many, spread over
# the run (the first and last included), are drawn; every one stays exact in the file
HISTOGRAM_STEPS = 20
# a search's (W&B sweep's) full definition, in the form ``wandb sweep FILE`` takes again
SEARCH_FILE = "sweep.yaml"
_IMAGE_KEY = re.compile(r"[^a-zA-Z0-9_\-./ ]")  # what MLflow's log_image accepts in a key
_NS = uuid.UUID("8f2b7c1e-4b7a-4f0e-9a55-7d1c1b0e0a11")


@dataclass
class Picture:
    key: str
    step: int
    ms: int
    file: FileRef | None = None  # an image file of the run
    histogram: dict[str, Any] | None = None  # or a histogram to draw
    ident: str = ""

    def path(self) -> str:
        """MLflow's layout for ``log_image(key=, step=, timestamp=)`` (its client's
        ``images/<key>+step+<step>+timestamp+<ms>+<uuid>``), with a uuid derived from
        the source so that a second import finds the first one's file."""
        return media.image_path(
            _IMAGE_KEY.sub("_", self.key), self.step, self.ms, str(uuid.uuid5(_NS, self.ident))
        )


@dataclass
class NativePlan:
    """What a run gets beyond its data, decided before any write."""

    tags: dict[str, str] = field(default_factory=dict)
    summary_tags: list[str] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)
    restore_tags: dict[str, str | None] = field(default_factory=dict)
    documents: dict[str, bytes] = field(default_factory=dict)  # small files made here
    record: dict[str, Any] = field(default_factory=dict)

    def done(self, previous: dict[str, Any]) -> dict[str, Any]:
        """The record the exporter reads to take it all back out, with what an earlier
        import added and this one cannot remove (MLflow deletes no metric or file)."""
        out = {**self.record, "tags": self.summary_tags, "restore_tags": self.restore_tags}
        for k in ("metrics", "files", "hidden"):
            old = [x for x in previous.get(k) or [] if isinstance(x, str)]
            out[k] = sorted(set(old) | set(out.get(k) or []))
        old_restore = previous.get("restore_tags")
        if isinstance(old_restore, dict):
            out["restore_tags"] = {**old_restore, **self.restore_tags}
        return out


def plan_native(payload: RunPayload, tags: dict[str, str], report: RunReport) -> NativePlan:
    """Summary texts as tags, the images and tables MLflow's UI should show."""
    plan = NativePlan()
    run = payload.run
    for name, text in native.summary_view(payload.summary, {}, set()).texts.items():
        key = fit_key(name, LIMITS)
        if key != name or key.startswith(("mlflow.", mc.TB_PREFIX)) or key in tags:
            key = fit_key("summary." + name, LIMITS)
        if key in tags:
            continue
        plan.tags[key] = text
        plan.summary_tags.append(key)
    if plan.summary_tags:
        report.mapped("summary-as-tags", "summary", f"{len(plan.summary_tags)} text value(s) as run tags")

    if schema.is_sweep(run) and payload.params.num_rows:
        import yaml

        tree = schema.unflatten(
            (p["path"], schema.loads_value(p["value_json"])) for p in payload.params.to_pylist()
        )
        plan.documents[SEARCH_FILE] = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode()
        report.mapped("search-definition", "params", f"the search's definition also as {SEARCH_FILE}")

    files = {f.path: f for a in payload.artifacts if a.row["type"] == "run-files" for f in a.files}
    start = mc.dt_to_ms(run.get("start_time")) or 0
    tables: list[dict[str, str]] = []
    hist: dict[str, list[Picture]] = {}
    for s in payload.series.to_pylist():
        ms = mc.dt_to_ms(s["timestamp"]) or start
        if media.parse_image(s["file_path"] or "") or media.derived(s):
            continue  # in MLflow's own layout already (from MLflow): shown as it is
        if s["kind"] in IMAGE_KINDS and s["file_path"] in files:
            ident = f"{payload.key}|{s['key']}|{s['step']}|{s['file_sha256'] or s['file_path']}"
            plan.pictures.append(Picture(s["key"], s["step"], ms, file=files[s["file_path"]], ident=ident))
        elif s["kind"] in TABLE_KINDS and s["file_path"] in files:
            tables.append({"path": s["file_path"], "type": "table"})
        elif s["kind"] == "histogram":
            value = schema.loads_value(s["value_json"])
            if isinstance(value, dict) and isinstance(value.get("values"), list):
                digest = hashlib.sha256(s["value_json"].encode()).hexdigest()[:16]
                ident = f"{payload.key}|{s['key']}|{s['step']}|{digest}"
                hist.setdefault(s["key"], []).append(
                    Picture(s["key"], s["step"], ms, histogram=value, ident=ident)
                )
    for pics in hist.values():
        plan.pictures += spread(pics, HISTOGRAM_STEPS)
    if hist:
        logged = sum(len(p) for p in hist.values())
        drawn = sum(min(len(p), HISTOGRAM_STEPS) for p in hist.values())
        report.mapped(
            "histograms-drawn",
            "series",
            f"{len(hist)} histogram key(s) drawn in MLflow's image view ({drawn} of {logged} steps); "
            f"exact values in {mc.SERIES_ARTIFACT}",
        )

    given = dict(
        zip(payload.tags.column("key").to_pylist(), payload.tags.column("value").to_pylist(), strict=True)
    )
    if plan.pictures:
        plan.restore_tags[TAG_LOGGED_IMAGES] = given.get(TAG_LOGGED_IMAGES)
        plan.tags[TAG_LOGGED_IMAGES] = "True"
    if tables:
        have = given.get(TAG_LOGGED_ARTIFACTS)
        listed = _json_list(have)
        merged = listed + [t for t in tables if t not in listed]
        plan.restore_tags[TAG_LOGGED_ARTIFACTS] = have
        plan.tags[TAG_LOGGED_ARTIFACTS] = json.dumps(merged)
    return plan


def spread(items: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced, the first and the last included."""
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def _json_list(text: str | None) -> list[Any]:
    try:
        v = json.loads(text) if text else []
    except ValueError:
        return []
    return v if isinstance(v, list) else []


class NativeWriter:
    """Writes what ``plan_native`` decided, each thing once."""

    def _show_natively(
        self,
        run_id: str,
        payload: RunPayload,
        plan: Any,
        shown: NativePlan,
        previous: dict[str, Any],
        existed: bool,
        report: RunReport,
    ) -> None:
        """After the run's points: its summary numbers beside them, its pictures in the
        image view; ``plan`` is the run's ``Plan`` (its metric keys so far)."""
        if plan.system_named:
            report.mapped(
                "system-metrics-named",
                "metrics",
                f"{plan.system_named} system metric(s) under MLflow's names (System metrics tab); "
                f"the originals in {mc.MAPPING_ARTIFACT}",
            )
        history = dict(plan._metric_cache)
        shown.record["metrics"] = self._write_summary_metrics(
            run_id, payload, history, plan._metric_keys, previous.get("metrics") or [], report
        )
        shown.record["files"] = self._write_pictures(run_id, shown.pictures, existed, report)
        shown.record["files"] += self._write_documents(run_id, shown.documents, existed)

    def _previous_native(self, run_id: str, state: dict[str, str]) -> dict[str, Any]:
        """What an earlier import of the run added (its extras' ``native`` record)."""
        if "extras" not in state:
            return {}
        try:
            with temp_dir() as d:
                local = self.client.download_artifacts(run_id, mc.EXTRAS_ARTIFACT, str(d))
                with open(local) as f:
                    got = json.load(f).get("native")
        except Exception:  # unreadable: the exporter says so loudly; here, start afresh
            return {}
        return got if isinstance(got, dict) else {}

    def _write_summary_metrics(
        self,
        run_id: str,
        payload: RunPayload,
        history: dict[str, str],
        keys: Any,
        previous: list[str],
        report: RunReport,
    ) -> list[str]:
        """Summary numbers as metrics of the runs table. ``history`` maps each history key
        to its MLflow key; returns the metric keys written (or already there). A summary
        metric an earlier import made keeps following the summary's value."""
        from mlflow.entities import Metric

        numbers = native.summary_view(payload.summary, {}, set()).metrics
        if not numbers and not previous:
            return []  # nothing to show: no request for the run's latest values
        r = self.client.get_run(run_id)
        latest = dict(r.data.metrics)
        shown = {orig: latest[k] for orig, k in history.items() if k in latest}
        view = native.summary_view(payload.summary, shown, set(history))
        run = payload.run
        ms = mc.dt_to_ms(run.get("end_time")) or mc.dt_to_ms(run.get("start_time")) or 0
        wanted = {keys.fit(name, ("summary", name)): value for name, value in view.metrics.items()}
        for key in previous:
            plain = key.removeprefix(native.SUMMARY_PREFIX)
            if key not in wanted and plain in numbers:
                wanted[key] = numbers[plain]
        out, todo = [], []
        for key, value in wanted.items():
            out.append(key)
            have = latest.get(key)
            if have is not None and native.same(have, value):
                continue
            step = 0
            if have is not None:  # the source's summary changed: a later step shows the new value
                step = max(m.step for m in self.client.get_metric_history(run_id, key)) + 1
            todo.append(Metric(key, value, ms, step))
        if todo:
            self.client.log_batch(run_id, metrics=todo, synchronous=True)
        if out:
            n = len(out)
            report.mapped("summary-as-metrics", "summary", f"{n} value(s) as metrics of the runs table")
        return sorted(set(out) | set(previous))

    def _write_documents(self, run_id: str, documents: dict[str, bytes], existed: bool) -> list[str]:
        """The small files the plan made (a search's definition), each written once."""
        if not documents:
            return []
        have = {}
        if existed:
            have = {fi.path: fi.file_size for fi in self.client.list_artifacts(run_id)}
        for path, data in documents.items():
            if have.get(path) == len(data):
                continue
            with temp_dir() as d:
                local = d / posixpath.basename(path)
                local.write_bytes(data)
                upload_one(str(local), path, lambda lp, ap: self.client.log_artifact(run_id, lp, ap))
        return sorted(documents)

    def _write_pictures(
        self, run_id: str, pictures: list[Picture], existed: bool, report: RunReport
    ) -> list[str]:
        """Images (and drawn histograms) in MLflow's image layout: the full picture as PNG
        and the small WebP its image card shows. Returns the paths, written or present."""
        if not pictures:
            return []
        have = set()
        if existed:
            listing = mc.walk_artifacts(lambda p: self.client.list_artifacts(run_id, p), "images")
            have = {fi.path for fi in listing}
        paths = []
        for pic in pictures:
            base = pic.path()
            full, small = base + ".png", base + "+compressed.webp"
            if full in have and small in have:
                paths += [full, small]
                continue
            with temp_dir() as d:
                png, webp = d / "full.png", d / "small.webp"
                try:
                    _render(pic, png, webp)
                except Exception as e:  # not a picture PIL reads: the file itself still moves
                    report.mapped(
                        "image-not-shown",
                        f"series.{pic.key}",
                        f"step {pic.step} is not in MLflow's image view ({first_line(e)}); "
                        "the file is kept as it was",
                    )
                    continue
                paths += [full, small]
                upload_one(str(png), full, lambda lp, ap: self.client.log_artifact(run_id, lp, ap))
                upload_one(str(webp), small, lambda lp, ap: self.client.log_artifact(run_id, lp, ap))
        return paths


def _render(pic: Picture, png: Any, webp: Any) -> None:
    """The PNG (a source PNG byte for byte) and MLflow's compressed copy of it."""
    import shutil

    from mlflow.tracking.multimedia import compress_image_size
    from PIL import Image

    if pic.file is not None:
        with pic.file.fetch() as local, Image.open(local) as im:
            if im.format == "PNG":
                shutil.copyfile(local, png)
            else:
                im.save(png, format="PNG")
    else:
        _draw_histogram(pic, png)
    with Image.open(png) as im:
        compress_image_size(im.convert("RGBA")).save(webp, format="WEBP")


def _draw_histogram(pic: Picture, png: Any) -> None:
    from matplotlib.figure import Figure  # no pyplot: the user's backend stays as it is

    h = pic.histogram or {}
    values = [float(v) for v in h.get("values") or []]
    bins = [float(b) for b in h.get("bins") or []]
    fig = Figure(figsize=(4, 3), dpi=100)
    ax = fig.add_subplot()
    if len(bins) == len(values) + 1:
        ax.stairs(values, bins, fill=True)
    else:  # W&B's "packed" form or a bare list of counts: bars by index
        ax.bar(range(len(values)), values)
    ax.set_title(f"{pic.key} (step {pic.step})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, format="png", metadata={"Software": None})
