"""Write neutral data into an MLflow tracking server or store, idempotently.

Identity lives in the destination: every run, logged model and model version carries
the source key in the tag ``trackbridge.source_key``. Importing again finds it and fills
in only what is missing, so a second import adds no run, no point and no version.

A run's ``trackbridge.fingerprint`` tag is written last. It is the run's completion
marker: a run that has it, with the source's current fingerprint, is skipped without a
single write; a run without it (an import killed half-way) is reconciled point by point.

MLflow's limits (key charset and length, 6,000-char params, 8,000-char tags, batch
sizes) are met by documented mappings, each reported, with the originals kept in the
run's ``trackbridge/mapping.json`` so the MLflow exporter can restore them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import posixpath
import re
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bridge import claims, schema
from bridge import mlflow_common as mc
from bridge.errors import DestinationError, first_line
from bridge.files import temp_dir
from bridge.model import ArtifactPayload, RegistryPayload, RunPayload
from bridge.report import RunReport
from bridge.retry import POLICY

MAX_KEY = 250
MAX_PARAM = 6000
MAX_TAG = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_BATCH_BYTES = 800_000  # MLflow refuses requests over 1 MB; keep room for JSON overhead
TRUNCATED = "…[truncated by trackbridge]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
MAPPING_VERSION = 1
# How SQLite, PostgreSQL and MySQL word a second insert of one row (a param that another
# importer wrote into the same run a moment before), through MLflow's store or server
_CONFLICT = re.compile(r"UNIQUE constraint|unique constraint|Duplicate entry|IntegrityError", re.IGNORECASE)


def fit_key(key: str) -> str:
    """The closest key MLflow accepts: allowed charset, no path tricks, ≤ 250 chars."""
    k = _BAD_KEY_CHARS.sub("_", key)
    parts = [("__" if p == ".." else p) for p in k.split("/") if p not in ("", ".")]
    k = "/".join(parts) or "_"
    if len(k) > MAX_KEY:
        k = k[: MAX_KEY - 9] + "-" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return k


class _KeySpace:
    """Fits keys into MLflow's rules and keeps two different keys from colliding."""

    def __init__(self) -> None:
        self.used: dict[str, object] = {}

    def fit(self, original: str, identity: object = None) -> str:
        """``identity`` tells keys apart that print the same (["a", "b"] vs ["a.b"])."""
        ident = original if identity is None else identity
        k = fit_key(original)
        if self.used.get(k, ident) != ident:
            k = k[: MAX_KEY - 9] + "-" + hashlib.sha1(repr(ident).encode()).hexdigest()[:8]
        self.used[k] = ident
        return k


def _param_text(value_json: str, value_type: str) -> str:
    if value_type in ("str", "datetime"):
        v = schema.loads_value(value_json)
        return v if isinstance(v, str) else value_json
    return value_json


class MlflowSink:
    def __init__(self, tracking_uri: str, safe: str | None = None, dry_run: bool = False) -> None:
        self.uri = tracking_uri
        self.safe = safe or tracking_uri
        self.dry_run = dry_run
        self.client = mc.client(tracking_uri)
        self._lock = threading.Lock()
        self._exp_ids: dict[str, str | None] = {}
        self._deleted_projects: list[str] = []
        self._index: dict[str, dict[str, Any]] = {}
        self._model_index: dict[str, dict[str, Any]] = {}
        self._run_ids: dict[str, str] = {}
        self._model_ids: dict[str, str] = {}
        self._artifact_dirs: dict[str, tuple[str, str]] = {}  # artifact key -> (run id, folder)
        self._tokens: dict[str, str] = {}  # run id -> source change token, written in finish()
        self._registry_failed = False
        self._exp_locks: dict[str, threading.Lock] = {}
        self._creds = (
            self.client._tracking_client.store.get_host_creds()
            if tracking_uri.startswith(("http://", "https://"))
            else None
        )
        self._sql = None if self._creds is not None else _SqlPoints.of(self.client._tracking_client.store)
        self._batch = _SqlPoints.BATCH if self._sql is not None else MAX_METRICS_PER_BATCH
        # a store every trackbridge process on this machine locks the same way (SQLite, a
        # file store): a look-up and a create under its lock are exact; elsewhere the
        # creator checks again after creating (bridge.claims)
        self._locked_store = tracking_uri.startswith(("sqlite:", "file:"))
        self.origin: str | None = None
        # what the sink did beyond the runs it was given (duplicates it retired), for the report
        self.notices: list[tuple[str, str, str]] = []

    def describe(self) -> str:
        return f"mlflow+{self.safe}"

    # -- lifecycle

    def begin(self, source: str) -> None:
        from mlflow.exceptions import MlflowException

        self.origin = source

        try:
            mc.first_contact(self.client)
        except (MlflowException, OSError) as e:
            raise DestinationError(f"{self.describe()}: cannot write ({first_line(e)})") from e

    def _token_later(self, run_id: str, payload: RunPayload) -> None:
        """Keep the run's change token for ``finish``: written only once the registry
        step is through, so that a sync killed before it reads the run again next time
        and registers its models then, instead of skipping it for good."""
        if payload.token and not self.dry_run and payload.run.get("lifecycle") != "deleted":
            with self._lock:
                self._tokens[run_id] = payload.token

    def finish(self) -> None:
        if self.dry_run:
            return
        if not self._registry_failed:
            for run_id, token in self._tokens.items():
                self.client.set_tag(run_id, mc.TAG_SOURCE_TOKEN, token)
        for exp_id in self._deleted_projects:
            mc.change_once(
                lambda e=exp_id: self.client.delete_experiment(e),
                lambda e=exp_id: self.client.get_experiment(e).lifecycle_stage == "deleted",
            )

    # -- projects

    def write_project(self, row: dict[str, Any]) -> None:
        name = row["name"]
        exp = self.client.get_experiment_by_name(name)
        tags = dict(row.get("tags") or [])
        if row.get("description"):
            tags[mc.TAG_NOTE] = row["description"]
        if self.dry_run:
            self._exp_ids[row["project_key"]] = exp.experiment_id if exp else None
            return
        if exp is None:
            raw = self.client.unwrapped
            exp_id = mc.create_once(
                lambda: raw.create_experiment(
                    name,
                    artifact_location=mc.experiment_artifact_location(self.uri, name),
                    tags={**tags, mc.TAG_SOURCE_KEY: row["project_key"]},
                ),
                lambda: getattr(raw.get_experiment_by_name(name), "experiment_id", None),
            )
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                mc.change_once(
                    lambda: self.client.restore_experiment(exp_id),
                    lambda: self.client.get_experiment(exp_id).lifecycle_stage == "active",
                )
            have = dict(exp.tags)
            for k, v in tags.items():
                if have.get(k) != v:
                    self.client.set_experiment_tag(exp_id, k, v)
        self._exp_ids[row["project_key"]] = exp_id
        if row.get("lifecycle") == "deleted":
            self._deleted_projects.append(exp_id)

    # -- identity look-ups

    def _cached(self, cache: dict[str, dict[str, Any]], exp_id: str, load: Any) -> dict[str, Any]:
        """Build a per-experiment index once, even with several workers asking at once."""
        with self._lock:
            lock = self._exp_locks.setdefault(f"{id(cache)}:{exp_id}", threading.Lock())
        with lock:
            if exp_id not in cache:
                cache[exp_id] = load(exp_id)
            return cache[exp_id]

    def _runs_index(self, exp_id: str) -> dict[str, Any]:
        """Runs trackbridge wrote into the experiment, by source key (deleted ones too)."""
        from mlflow.entities import ViewType

        def load(exp_id: str) -> dict[str, Any]:
            runs = mc.paged(
                lambda t: self.client.search_runs(
                    [exp_id],
                    filter_string=f"tags.`{mc.TAG_SOURCE_KEY}` LIKE '%'",
                    run_view_type=ViewType.ALL,
                    max_results=1000,
                    page_token=t,
                )
            )
            live = []
            for r in runs:
                if mc.TAG_DUPLICATE_OF in r.data.tags:
                    self._finish_retiring(r)
                else:
                    live.append(r)
            single, dups = claims.group_by_key(live, lambda r: r.data.tags[mc.TAG_SOURCE_KEY])
            for key, copies in dups.items():
                single[key] = self._keep_one(key, copies)
            return single

        return self._cached(self._index, exp_id, load)

    def _keep_one(self, key: str, copies: list[Any]) -> Any:
        """Of several runs carrying one source key (two importers created it at once), keep
        the earliest claim and retire the others; what they held is in the keeper, or is
        written into it by this import."""
        keep = claims.keeper(
            copies,
            lambda r: r.data.tags.get(mc.TAG_CLAIM),
            lambda r: r.info.run_id,
            lambda r: mc.TAG_FINGERPRINT in r.data.tags,
        )
        notice = ("duplicate-removed", "deleted the others (tagged trackbridge.duplicate_of)")
        for r in copies:
            if r is not keep:
                try:
                    self._retire(r, keep.info.run_id)
                except Exception as e:  # the keeper is still the one written; verify shows the rest
                    notice = ("duplicate-not-removed", f"could not delete the others ({first_line(e)})")
        with self._lock:
            self.notices.append(
                (
                    notice[0],
                    key,
                    f"{len(copies) - 1} other run(s) carried this source key; kept {keep.info.run_id}, "
                    + notice[1],
                )
            )
        return keep

    def _retire(self, r: Any, keeper_id: str) -> None:
        """Mark a duplicate first (every trackbridge reader then ignores it), then delete it:
        a kill in between leaves a marked run that the next index load deletes. MLflow
        tags only active runs, so a deleted duplicate is restored for the mark."""
        run_id = r.info.run_id
        if r.info.lifecycle_stage == "deleted":
            mc.change_once(
                lambda: self.client.restore_run(run_id),
                lambda: self.client.get_run(run_id).info.lifecycle_stage == "active",
            )
        self.client.set_tag(run_id, mc.TAG_DUPLICATE_OF, keeper_id)
        self._finish_retiring(self.client.get_run(run_id))

    def _finish_retiring(self, r: Any) -> None:
        if r.info.lifecycle_stage != "deleted":
            run_id = r.info.run_id
            mc.change_once(
                lambda: self.client.delete_run(run_id),
                lambda: self.client.get_run(run_id).info.lifecycle_stage == "deleted",
            )

    def _runs_with_key(self, exp_ids: list[str], key: str, client: Any = None) -> list[Any]:
        """Every run carrying ``key`` (deleted ones too) but the copies trackbridge retired,
        asked fresh, not from the index."""
        from mlflow.entities import ViewType

        if self._creds is None and _sql_has_key(self.client._tracking_client.store, exp_ids, key) is False:
            return []  # the usual answer for a new run, from one indexed query (~1 ms, not ~15)
        found = (client or self.client).search_runs(
            exp_ids,
            filter_string=f"tags.`{mc.TAG_SOURCE_KEY}` = '{_quote(key)}'",
            run_view_type=ViewType.ALL,
            max_results=100,
        )
        return [r for r in found if mc.TAG_DUPLICATE_OF not in r.data.tags]

    def _find_or_create(self, exp_id: str, payload: RunPayload) -> tuple[Any, bool]:
        """The destination run for a source run the index did not have: one another
        process made meanwhile, else a new one. Returns (run, created)."""
        run, key = payload.run, payload.key
        raw = self.client.unwrapped
        with mc.store_lock(self.uri):
            found = self._runs_with_key([exp_id], key)
            if found:
                return (found[0] if len(found) == 1 else self._keep_one(key, found)), False
            created = mc.create_once(
                lambda: raw.create_run(
                    exp_id,
                    start_time=mc.dt_to_ms(run.get("start_time")),
                    # an empty user, not the importing account's: MLflow fills in the OS user otherwise
                    tags={
                        mc.TAG_USER: run.get("user") or "",
                        mc.TAG_SOURCE_KEY: key,
                        mc.TAG_CLAIM: claims.new_claim(),
                    },
                    run_name=run.get("name"),
                ),
                lambda: self._search_run(raw, exp_id, key),
            )
        if not self._locked_store:
            # no lock reaches the other importers: look again, and give way to an earlier claim
            found = self._runs_with_key([exp_id], key)
            mine = created.info.run_id
            if found and all(r.info.run_id != mine for r in found):
                # the other importer looked after us and retired ours: its copy is the one
                return (found[0] if len(found) == 1 else self._keep_one(key, found)), False
            if len(found) > 1:
                keep = self._keep_one(key, found)
                if keep.info.run_id != mine:
                    return keep, False
        return created, True

    def _find_run_id(self, run_key: str) -> str | None:
        with self._lock:
            if run_key in self._run_ids:
                return self._run_ids[run_key]
        found = self._runs_with_key([e for e in self._exp_ids.values() if e] or ["0"], run_key)
        if len(found) > 1:  # racing importers left copies: the same keeper as _keep_one's
            return self._keep_one(run_key, found).info.run_id
        return found[0].info.run_id if found else None

    def _models_index(self, exp_id: str) -> dict[str, Any]:
        """Logged models trackbridge wrote into the experiment, by source key."""
        from mlflow.exceptions import MlflowException

        def load(exp_id: str) -> dict[str, Any]:
            found: dict[str, Any] = {}
            try:
                for m in mc.paged(
                    lambda t: self.client.search_logged_models([exp_id], max_results=100, page_token=t)
                ):
                    if mc.TAG_SOURCE_KEY in m.tags:
                        found[m.tags[mc.TAG_SOURCE_KEY]] = m
            except MlflowException as e:
                if not mc.endpoint_missing(e):
                    raise
            return found

        return self._cached(self._model_index, exp_id, load)

    # -- runs

    def write_run(self, payload: RunPayload, report: RunReport) -> str:
        for attempt in (1, 2):
            seen: dict[str, str] = {}
            try:
                return self._write_run(payload, report, seen)
            except Exception as e:
                if self._finished_by_another(payload, seen):
                    report.mapped(
                        "written-concurrently", "runs", "another importer finished this run meanwhile"
                    )
                    return "unchanged"
                if attempt == 2 or "run_id" not in seen or not _CONFLICT.search(str(e)):
                    raise
                # another importer is writing the same run right now (two machines, no shared
                # lock): MLflow refuses the second insert of a param; read the run afresh and
                # write only what it still lacks
                self._forget(payload.run["project_key"], payload.key)
                report.points = report.files = report.bytes = 0
                report.mappings.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    def _forget(self, project_key: str, key: str) -> None:
        exp_id = self._exp_ids.get(project_key)
        with self._lock:
            if exp_id in self._index:
                self._index[exp_id].pop(key, None)

    def _finished_by_another(self, payload: RunPayload, seen: dict[str, str]) -> bool:
        """A write that failed because another importer wrote the same run at the same
        time (it finished first, and deleted it as the source has it) is no failure: the
        run is complete, as the fingerprint it now carries says."""
        if "run_id" not in seen or "fp" not in seen:
            return False
        try:
            r = self.client.unwrapped.get_run(seen["run_id"])
        except Exception:
            return False
        return (
            r.data.tags.get(mc.TAG_FINGERPRINT) == seen["fp"]
            and r.info.lifecycle_stage == (payload.run.get("lifecycle") or "active")
            and mc.TAG_DUPLICATE_OF not in r.data.tags
        )

    def _write_run(self, payload: RunPayload, report: RunReport, seen: dict[str, str]) -> str:
        run = payload.run
        key = payload.key
        exp_id = self._exp_ids.get(run["project_key"])
        if exp_id is None and not self.dry_run:
            raise DestinationError(f"run {key}: its project {run['project_key']} was not imported")
        existing = self._runs_index(exp_id).get(key) if exp_id else None
        created = None
        if existing is None and exp_id and not self.dry_run:
            # the index was read once; another importer may have made the run since
            got, made = self._find_or_create(exp_id, payload)
            if made:
                created = got
            else:
                existing = got
        fp = _fingerprint(payload)
        seen["fp"] = fp
        if existing is not None or created is not None:
            seen["run_id"] = (existing or created).info.run_id
        if (
            existing is not None
            and existing.data.tags.get(mc.TAG_FINGERPRINT) == fp
            and existing.info.lifecycle_stage == (run.get("lifecycle") or "active")
        ):
            with self._lock:
                self._run_ids[key] = existing.info.run_id
            report.destination_id = existing.info.run_id
            if existing.data.tags.get(mc.TAG_SOURCE_TOKEN) != payload.token:
                # the same content under a new token (a file touched, or imported by
                # migrate): remember it, so the next sync skips this run unread
                self._token_later(existing.info.run_id, payload)
            self._remember_artifact_dirs(payload, existing.info.run_id)
            for a in payload.artifacts:
                if a.row["type"] == "mlflow.logged_model":
                    m = self._models_index(exp_id).get(a.row["artifact_key"])
                    if m is not None:
                        with self._lock:
                            self._model_ids[a.row["artifact_key"]] = m.model_id
            return "unchanged"
        outcome = "updated" if existing is not None else "new"
        plan = _Plan(report)
        params = plan.params(payload.params)
        tags = plan.tags(payload.tags, run)
        if self.origin:
            tags[mc.TAG_SOURCE] = self.origin
        if self.dry_run:
            report.points = sum(b.num_rows for b in payload.metrics())
            return outcome

        if existing is None:
            run_id = created.info.run_id
            have_params: dict[str, str] = {}
            have_tags: dict[str, str] = dict(created.data.tags)
            have_metric_keys: set[str] = set()
        else:
            run_id = existing.info.run_id
            if existing.info.lifecycle_stage == "deleted":
                mc.change_once(
                    lambda: self.client.restore_run(run_id),
                    lambda: self.client.get_run(run_id).info.lifecycle_stage == "active",
                )
            have_params = dict(existing.data.params)
            have_tags = dict(existing.data.tags)
            have_metric_keys = set(existing.data.metrics)
        with self._lock:
            self._run_ids[key] = run_id
        report.destination_id = run_id
        self._remember_artifact_dirs(payload, run_id)

        parent = run.get("parent_run_key")
        if parent:
            pid = self._find_run_id(parent)
            if pid:
                tags[mc.TAG_PARENT] = pid
            else:
                report.mapped(
                    "parent-missing",
                    "runs.parent_run_key",
                    f"parent {parent} is not in the destination; nesting not set",
                )
        new_params = {}
        for k, v in params.items():
            if k not in have_params:
                new_params[k] = v
            elif have_params[k] != v:
                report.mapped(
                    "param-conflict",
                    f"params.{k}",
                    f"destination keeps {have_params[k]!r}; MLflow params are immutable "
                    f"and the source now has {v!r}",
                )
        new_tags = {k: v for k, v in tags.items() if have_tags.get(k) != v}
        self._log_params_tags(run_id, new_params, new_tags)

        for art in payload.artifacts:
            if art.row["type"] == "mlflow.logged_model":
                self._write_logged_model(art, exp_id, run_id, report)
        self._write_metrics(run_id, payload, plan, have_metric_keys if existing else None, report)
        for art in payload.artifacts:
            if art.row["type"] == "run-files":
                self._upload_run_files(run_id, art, existing is not None, report)
            elif art.row["type"] != "mlflow.logged_model":
                placed = _under(art, mc.artifact_dir(art.row))
                self._upload_run_files(run_id, placed, existing is not None, report)
        self._write_datasets(run_id, payload.dataset_inputs, existing)
        self._write_extras(run_id, payload, report)

        if plan.mapping_needed():
            with temp_dir() as d:
                p = d / "mapping.json"
                p.write_text(json.dumps(plan.mapping, indent=1, ensure_ascii=False))
                self.client.log_artifact(run_id, str(p), mc.MAPPING_DIR)
            self.client.set_tag(run_id, mc.TAG_MAPPED, str(len(report.mappings)))

        status = mc.TO_MLFLOW_STATUS.get(run.get("status") or "finished", "FINISHED")
        if existing is not None and run.get("name") and existing.info.run_name != run["name"]:
            self.client.update_run(run_id, name=run["name"])  # renamed in the source since
        if status in ("FINISHED", "FAILED", "KILLED") and run.get("end_time") is not None:
            self.client.set_terminated(run_id, status, end_time=mc.dt_to_ms(run.get("end_time")))
        else:
            self.client.update_run(run_id, status=status)
        self._forget_stale_tags(run_id, have_tags, tags)
        self.client.set_tag(run_id, mc.TAG_FINGERPRINT, fp)
        self._token_later(run_id, payload)
        if run.get("lifecycle") == "deleted":
            # After the marker: MLflow refuses writes to a deleted run. A kill in between
            # is caught by the lifecycle check in the unchanged test above.
            mc.change_once(
                lambda: self.client.delete_run(run_id),
                lambda: self.client.get_run(run_id).info.lifecycle_stage == "deleted",
            )
        return outcome

    def _search_run(self, client: Any, exp_id: str, key: str) -> Any:
        """The run carrying ``key`` (deleted ones too), for a retried create_run."""
        found = self._runs_with_key([exp_id], key, client)
        return found[0] if found else None

    def synced(self, project_key: str) -> dict[str, tuple[str | None, str]]:
        """Runs a completed import left in the project's experiment: source key ->
        (source token, run id). One paged search, so a sync knows what it may skip
        without a local cache: identity lives in the destination."""
        exp_id = self._exp_ids.get(project_key)
        if not exp_id:
            return {}
        out = {}
        for k, r in self._runs_index(exp_id).items():
            if mc.TAG_FINGERPRINT in r.data.tags:
                out[k] = (r.data.tags.get(mc.TAG_SOURCE_TOKEN), r.info.run_id)
        return out

    def _forget_stale_tags(self, run_id: str, have: dict[str, str], wanted: dict[str, str]) -> None:
        """Tags an earlier import set from run state the source no longer has: a run no
        longer incomplete or crashed, a W&B tag removed. Left alone, they would lie."""
        from mlflow.exceptions import MlflowException

        derived = (mc.TAG_INCOMPLETE, mc.TAG_SOURCE_STATUS)
        for k in have:
            if k not in wanted and (k in derived or k.startswith(mc.LABEL_PREFIX)):
                try:
                    self.client.delete_tag(run_id, k)
                except MlflowException as e:
                    # gone already: a retried delete whose first answer was lost
                    if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise

    def _remember_artifact_dirs(self, payload: RunPayload, run_id: str) -> None:
        """Where each source artifact's files go in the run, for model versions made from them."""
        with self._lock:
            for a in payload.artifacts:
                if a.row["type"] not in ("run-files", "mlflow.logged_model"):
                    self._artifact_dirs[a.row["artifact_key"]] = (run_id, mc.artifact_dir(a.row))

    def _write_extras(self, run_id: str, payload: RunPayload, report: RunReport) -> None:
        """Keep what MLflow has no field for in run files the exporter reads back."""
        extras = extras_of(payload)
        if extras is None and payload.series.num_rows == 0:
            return
        with temp_dir() as d:
            if extras is not None:
                (d / "extras.json").write_text(json.dumps(extras, indent=1, ensure_ascii=False, default=str))
            if payload.series.num_rows:
                import pyarrow.parquet as pq

                pq.write_table(payload.series, d / "series.parquet")
            self.client.log_artifacts(run_id, str(d), mc.MAPPING_DIR)
        self.client.set_tag(run_id, mc.TAG_EXTRAS, "1")
        if payload.summary.num_rows:
            n = payload.summary.num_rows
            report.mapped("summary-kept", "summary", f"{n} value(s) in {mc.EXTRAS_ARTIFACT}")
        if payload.series.num_rows:
            n = payload.series.num_rows
            report.mapped("series-kept", "series", f"{n} value(s) in {mc.SERIES_ARTIFACT}")

    def _log_params_tags(self, run_id: str, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        items = [Param(k, v) for k, v in params.items()] + [RunTag(k, v) for k, v in tags.items()]
        for chunk in _chunks_by_size(items, MAX_PARAMS_TAGS_PER_BATCH, MAX_BATCH_BYTES):
            self.client.log_batch(
                run_id,
                params=[x for x in chunk if isinstance(x, Param)],
                tags=[x for x in chunk if isinstance(x, RunTag)],
                synchronous=True,
            )

    def _write_metrics(
        self,
        run_id: str,
        payload: RunPayload,
        plan: _Plan,
        have_keys: set[str] | None,
        report: RunReport,
    ) -> None:
        """Send every point in batches of 1,000; for a run that exists, only the missing ones."""
        have: dict[str, Counter[tuple[int, int, str]]] = {}
        pending: list[dict[str, Any]] = []
        for batch in payload.metrics():
            recs = _records(batch, plan, self._model_ids)
            if have_keys:
                recs = self._missing(run_id, recs, have_keys, have)
            pending += recs
            full = len(pending) - len(pending) % self._batch
            for i in range(0, full, self._batch):
                self._send_metrics(run_id, pending[i : i + self._batch])
            report.points += full
            del pending[:full]  # one shift per source batch, not one per request
        if pending:
            self._send_metrics(run_id, pending)
            report.points += len(pending)

    def append_points(self, run_id: str, batch: pa.RecordBatch) -> None:
        """Points for a run being logged right now (the dual-logging shim): fitted to
        MLflow as an import fits them, sent at once, never diffed."""
        plan = _Plan(RunReport(run_key=""))
        recs = _records(batch, plan, self._model_ids)
        for i in range(0, len(recs), self._batch):
            self._send_metrics(run_id, recs[i : i + self._batch])

    def _missing(
        self,
        run_id: str,
        recs: list[dict[str, Any]],
        have_keys: set[str],
        have: dict[str, Counter[tuple[int, int, str]]],
    ) -> list[dict[str, Any]]:
        """Drop the points the destination already holds (an import that died half-way)."""
        out = []
        for r in recs:
            key = r["key"]
            if key not in have_keys:
                out.append(r)
                continue
            if key not in have:
                # points come sorted by key: the keys before this one are done, and one
                # key's history at a time is what memory holds
                have.clear()
                have[key] = Counter(
                    (m.step, m.timestamp, _vkey(m.value)) for m in self.client.get_metric_history(run_id, key)
                )
            sig = (r["step"], r["timestamp"], _vkey(r["value"]))
            if have[key][sig] > 0:
                have[key][sig] -= 1
            else:
                out.append(r)
        return out

    def _send_metrics(self, run_id: str, recs: list[dict[str, Any]]) -> None:
        if self._creds is not None:
            # REST: post the JSON ourselves. MLflow's client would build an entity and a
            # protobuf per point first, CPU the server (often on the same box) needs more.
            # A repeated batch is harmless: the store's primary key drops identical points.
            body = {"run_id": run_id, "metrics": [_json_point(r) for r in recs]}
            mc.rest(self._creds, "/api/2.0/mlflow/runs/log-batch", "POST", json=body)
            return
        if self._sql is not None and not any("model_id" in r for r in recs):
            # under the same retries as every client call ("database is locked" while
            # another process writes the store); a failed attempt's transaction is rolled
            # back, and a repeat adds nothing (INSERT OR IGNORE)
            POLICY.call(lambda: self._sql.write(run_id, recs))
            return
        from mlflow.entities import Metric

        for i in range(0, len(recs), MAX_METRICS_PER_BATCH):
            chunk = recs[i : i + MAX_METRICS_PER_BATCH]
            self.client.log_batch(run_id, metrics=[Metric(**r) for r in chunk], synchronous=True)

    def _upload_run_files(self, run_id: str, art: ArtifactPayload, existed: bool, report: RunReport) -> None:
        _upload_missing(
            art,
            (lambda p: self.client.list_artifacts(run_id, p)) if existed else None,
            lambda lp, ap: self.client.log_artifact(run_id, lp, ap),
            report,
        )

    def _write_datasets(self, run_id: str, tbl: pa.Table, existing: Any) -> None:
        if tbl.num_rows == 0:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        have = set()
        if existing is not None and existing.inputs:
            have = {
                (d.dataset.name, d.dataset.digest, tuple(sorted((t.key, t.value) for t in d.tags)))
                for d in existing.inputs.dataset_inputs
            }
        todo = []
        for d in tbl.to_pylist():
            tags = tuple(sorted(d["tags"] or []))
            if (d["name"], d["digest"], tags) in have:
                continue
            todo.append(
                DatasetInput(
                    Dataset(d["name"], d["digest"], d["source_type"], d["source"], d["schema"], d["profile"]),
                    [InputTag(k, v) for k, v in tags],
                )
            )
        if todo:
            self.client.log_inputs(run_id, datasets=todo)

    # -- MLflow 3 logged models

    def _write_logged_model(
        self, art: ArtifactPayload, exp_id: str, run_id: str | None, report: RunReport | None
    ) -> str:
        from mlflow.entities import LoggedModelStatus

        key = art.row["artifact_key"]
        meta = json.loads(art.row.get("metadata_json") or "{}")
        index = self._models_index(exp_id)
        m = index.get(key)
        if m is None:
            tags = {k: v for k, v in meta.get("tags", {}).items() if k not in mc.MANAGED_MODEL_TAGS}
            tags[mc.TAG_SOURCE_KEY] = key
            if self.origin:
                tags[mc.TAG_SOURCE] = self.origin
            if meta.get("creation_timestamp") is not None:
                tags[mc.TAG_SOURCE_CREATED] = str(meta["creation_timestamp"])
            raw = self.client.unwrapped
            m = mc.create_once(
                lambda: raw.create_logged_model(
                    exp_id,
                    name=art.row["name"],
                    source_run_id=run_id,
                    tags=tags,
                    params=meta.get("params") or None,
                    model_type=meta.get("model_type"),
                ),
                lambda: next(
                    (
                        x
                        for x in mc.paged(
                            lambda t: raw.search_logged_models([exp_id], max_results=100, page_token=t)
                        )
                        if x.tags.get(mc.TAG_SOURCE_KEY) == key
                    ),
                    None,
                ),
            )
            with self._lock:
                index[key] = m
        with self._lock:
            self._model_ids[key] = m.model_id
        _upload_missing(
            art,
            lambda p: self.client.list_logged_model_artifacts(m.model_id, p),
            lambda lp, ap: self.client.log_model_artifact(m.model_id, lp, ap),
            report,
        )
        status = meta.get("status", "READY")
        if "READY" in status and str(m.status) != str(LoggedModelStatus.READY):
            self.client.finalize_logged_model(m.model_id, LoggedModelStatus.READY)
        elif "FAILED" in status and "FAILED" not in str(m.status):
            self.client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED)
        return m.model_id

    def write_artifact(self, payload: ArtifactPayload, report: Any) -> None:
        """An artifact no run owns (a Neptune model version's files) has one home in
        MLflow 3: a logged model, which needs no run; its type becomes the model type."""
        exp_id = self._exp_ids.get(payload.row["project_key"])
        if exp_id is None or self.dry_run:
            return
        if payload.row["type"] != "mlflow.logged_model":
            meta = {"model_type": payload.row["type"], "tags": {}}
            if payload.row.get("version"):
                meta["tags"][mc.TAG_SOURCE_VERSION] = str(payload.row["version"])
            payload = dataclasses.replace(
                payload,
                row={**payload.row, "metadata_json": json.dumps(meta)},
                files=_sendable(payload.files),
            )
            report.mapped(
                "artifact-as-logged-model",
                payload.row["artifact_key"],
                f"{payload.row['type']!r} artifact {payload.row['name']!r} written as an MLflow logged model",
            )
        self._write_logged_model(payload, exp_id, None, None)

    # -- registry

    def write_registry(self, payload: RegistryPayload, report: Any) -> None:
        try:
            self._write_registry(payload, report)
        except BaseException:
            self._registry_failed = True
            raise

    def _write_registry(self, payload: RegistryPayload, report: Any) -> None:
        from mlflow.exceptions import MlflowException

        versions = payload.model_versions.to_pylist()
        by_model: dict[str, list[dict[str, Any]]] = {}
        for v in versions:
            by_model.setdefault(v["model_name"], []).append(v)
        for rm in payload.registered_models.to_pylist():
            name = rm["name"]
            if self.dry_run:
                continue
            try:
                have = self.client.get_registered_model(name)
            except MlflowException:
                have = None
            tags = dict(rm["tags"] or [])
            if have is None:
                try:
                    self.client.create_registered_model(name, tags=tags, description=rm["description"])
                except MlflowException as e:
                    # another shard, or a retried request whose answer was lost, made it
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            else:
                if (have.description or None) != rm["description"]:
                    self.client.update_registered_model(name, description=rm["description"] or "")
                for k, v in tags.items():
                    if have.tags.get(k) != v:
                        self.client.set_registered_model_tag(name, k, v)
            self._write_versions(name, by_model.get(name, []), report)

    def _write_versions(self, name: str, versions: list[dict[str, Any]], report: Any) -> None:
        existing = {}
        for v in self.client.search_model_versions(f"name='{_quote(name)}'", max_results=10000):
            if mc.TAG_SOURCE_KEY in v.tags:
                existing[mc.version_origin(dict(v.tags))] = v
        wanted_aliases: dict[str, str] = {}
        ours = set()
        for sv in sorted(versions, key=lambda v: int(v["version"]) if v["version"].isdigit() else 0):
            dv = mc.find_by_key(existing, sv["version_key"])
            if dv is None:
                dv, made = self._create_version(name, sv, report)
                outcome = "new" if made else "unchanged"
                report.models[outcome] = report.models.get(outcome, 0) + 1
            else:
                report.models["unchanged"] = report.models.get("unchanged", 0) + 1
                if (dv.description or None) != sv["description"]:
                    self.client.update_model_version(name, dv.version, description=sv["description"] or "")
                for k, v in dict(sv["tags"] or []).items():
                    if dv.tags.get(k) != v:
                        self.client.set_model_version_tag(name, dv.version, k, v)
            ours.add(str(dv.version))
            stage = sv.get("stage")
            if stage and stage != "None" and dv.current_stage != stage:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still used
                    self.client.transition_model_version_stage(name, dv.version, stage)
            for a in sv["aliases"] or []:
                fitted = _fit_alias(a, f"{name}: alias {a!r}", report)
                if fitted:
                    wanted_aliases[fitted] = str(dv.version)
        if not ours:
            return
        current = self.client.get_registered_model(name).aliases or {}
        for alias, version in wanted_aliases.items():
            if str(current.get(alias)) != version:
                self.client.set_registered_model_alias(name, alias, version)
        for alias, version in current.items():
            if alias not in wanted_aliases and str(version) in ours:
                self.client.delete_registered_model_alias(name, alias)

    def _create_version(self, name: str, sv: dict[str, Any], report: Any) -> tuple[Any, bool]:
        run_id = self._find_run_id(sv["run_key"]) if sv["run_key"] else None
        model_id = self._model_ids.get(sv["artifact_key"]) if sv["artifact_key"] else None
        placed = self._artifact_dirs.get(sv["artifact_key"] or "")
        source = sv["source"]
        if model_id and (source or "").startswith("models:/"):
            source = f"models:/{model_id}"
        elif placed and not sv["source_subpath"]:
            # a W&B model artifact: its files, uploaded to the run that logged it
            run_id = placed[0]
            source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{placed[1]}"
        elif run_id and sv["source_subpath"]:
            source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{sv['source_subpath']}"
        else:
            report.mapped(
                "model-source-kept",
                f"{name} v{sv['version']}",
                f"source {source!r} points outside the migrated runs and was kept as is",
            )
        tags = {
            **dict(sv["tags"] or []),
            mc.TAG_SOURCE_KEY: sv["version_key"],
            mc.TAG_SOURCE_VERSION: sv["version"],
            **({mc.TAG_SOURCE: self.origin} if self.origin else {}),
        }
        if placed and not sv["source_subpath"]:
            tags[mc.TAG_SOURCE_ARTIFACT] = sv["artifact_key"]
        if sv.get("created_at") is not None:
            tags[mc.TAG_SOURCE_CREATED] = sv["created_at"].isoformat()
        raw = self.client.unwrapped

        def create() -> Any:
            with mc.global_tracking_uri(self.uri):
                return raw.create_model_version(
                    name, source, run_id=run_id, tags=tags, description=sv["description"], model_id=model_id
                )

        def find() -> Any:
            return next(
                (
                    v
                    for v in raw.search_model_versions(f"name='{_quote(name)}'", max_results=10000)
                    if v.tags.get(mc.TAG_SOURCE_KEY) == sv["version_key"]
                ),
                None,
            )

        # another importer may have registered it since this model's versions were listed
        with mc.store_lock(self.uri):
            found = find()
            if found is not None:
                return found, False
            return mc.create_once(create, find), True


class _Plan:
    """How one run's keys and values are fitted into MLflow, and the record to undo it."""

    def __init__(self, report: RunReport) -> None:
        self.report = report
        self.mapping: dict[str, Any] = {"version": MAPPING_VERSION, "params": {}, "tags": {}, "metrics": {}}
        self._param_keys = _KeySpace()
        self._tag_keys = _KeySpace()
        self._metric_keys = _KeySpace()
        self._metric_cache: dict[str, str] = {}
        self._reported: set[tuple[str, str, str]] = set()

    def mapping_needed(self) -> bool:
        return any(self.mapping[k] for k in ("params", "tags", "metrics"))

    def _fit_value(self, text: str, limit: int, where: str) -> tuple[str, bool]:
        """Truncate to MLflow's limit, visibly; the caller keeps the full value in mapping.json."""
        if len(text) <= limit:
            return text, False
        self.report.mapped("value-truncated", where, f"full value in {mc.MAPPING_ARTIFACT}")
        return text[: limit - len(TRUNCATED)] + TRUNCATED, True

    def params(self, tbl: pa.Table) -> dict[str, str]:
        out = {}
        for p in tbl.to_pylist():
            original = ".".join(p["path"])
            key = self._param_keys.fit(original, tuple(p["path"]))
            if key != original:
                self.report.mapped("key-renamed", f"params.{original}", f"written as {key!r}")
            text, cut = self._fit_value(
                _param_text(p["value_json"], p["value_type"]), MAX_PARAM, f"params.{original}"
            )
            exact = key == original and len(p["path"]) == 1 and p["value_type"] == "str" and not cut
            if not exact:
                self.mapping["params"][key] = {k: p[k] for k in ("path", "value_json", "value_type")}
            out[key] = text
        return out

    def tags(self, tbl: pa.Table, run: dict[str, Any]) -> dict[str, str]:
        out = {}
        for t in tbl.to_pylist():
            original = t["key"]
            if original in (mc.TAG_PARENT, mc.TAG_USER, mc.TAG_RUN_NAME) or mc.is_bookkeeping(original):
                continue  # set from the run's own fields, or ours to manage
            key = self._tag_keys.fit(original)
            if key != original:
                self.report.mapped("key-renamed", f"tags.{original}", f"written as {key!r}")
            value, cut = self._fit_value(t["value"] or "", MAX_TAG, f"tags.{original}")
            if key != original or cut:
                self.mapping["tags"][key] = {"key": original, "value": t["value"]}
            out[key] = value
        if run.get("notes"):
            notes, cut = self._fit_value(run["notes"], MAX_TAG, "runs.notes")
            if cut:
                self.mapping["tags"][mc.TAG_NOTE] = {"key": mc.TAG_NOTE, "value": run["notes"]}
            out[mc.TAG_NOTE] = notes
        for f, tag in mc.RUN_FIELD_TAGS.items():
            if run.get(f) and tag not in out:
                value, cut = self._fit_value(str(run[f]), MAX_TAG, f"runs.{f}")
                if cut:
                    self.mapping["tags"][tag] = {"key": tag, "value": str(run[f])}
                out[tag] = value
        for label in run.get("labels") or []:
            original = mc.LABEL_PREFIX + label
            key = self._tag_keys.fit(original)
            if key != original:
                self.report.mapped("key-renamed", f"runs.labels.{label}", f"written as tag {key!r}")
                self.mapping["tags"][key] = {"key": original, "value": ""}
            out[key] = ""
        if run.get("source_incomplete"):
            out[mc.TAG_INCOMPLETE] = "true"
        if run.get("step_scale"):
            out[mc.TAG_STEP_SCALE] = str(run["step_scale"])
            self.report.mapped(
                "step-scaled",
                "metrics.step",
                f"decimal steps written × {run['step_scale']} as MLflow's integer steps; "
                f"divide by tag {mc.TAG_STEP_SCALE} for the exact step",
            )
        if run.get("status") == "crashed":
            out[mc.TAG_SOURCE_STATUS] = "crashed"
            self.report.mapped(
                "status-mapped",
                "runs.status",
                f"crashed written as FAILED; original in tag {mc.TAG_SOURCE_STATUS}",
            )
        return out

    def once(self, kind: str, where: str, detail: str) -> None:
        """Report a mapping that applies to many points once per run, not once per batch."""
        if (kind, where, detail) not in self._reported:
            self._reported.add((kind, where, detail))
            self.report.mapped(kind, where, detail)

    def metric_key(self, original: str) -> str:
        k = self._metric_cache.get(original)
        if k is None:
            k = self._metric_keys.fit(original)
            self._metric_cache[original] = k
            if k != original:
                self.mapping["metrics"][k] = original
                self.report.mapped("key-renamed", f"metrics.{original}", f"written as {k!r}")
        return k


class _SqlPoints:
    """Metric points straight into an in-process SQLite store, one statement a batch.

    ``log_batch`` into a SQL store goes through SQLAlchemy's unit of work, one ORM object
    a point: about 220 µs a point here (4,500 points/s), so a 10M-point run would take
    40 minutes. The same rows go in with one ``INSERT OR IGNORE`` per 50,000 points, and
    the run's latest values through MLflow's own ``_update_latest_metrics_if_necessary``
    with one candidate per key, in one transaction. So the rows, the duplicate rule (the
    table's primary key) and the latest-value rule are ``log_batch``'s. Used only when
    the store has every part this relies on; otherwise ``log_batch`` it is."""

    BATCH = 50_000
    _NEEDS = (
        "ManagedSessionMaker",
        "_get_run",
        "_check_run_is_active",
        "_update_latest_metrics_if_necessary",
        "sanitize_metric_value",
    )
    _COLUMNS = ("key", "value", "timestamp", "run_uuid", "step", "is_nan")

    def __init__(self, store: Any, table: Any) -> None:
        self.store = store
        self._sql = (
            f"INSERT OR IGNORE INTO {table.name} ({', '.join(self._COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)"
        )

    @classmethod
    def of(cls, store: Any) -> _SqlPoints | None:
        try:
            from mlflow.store.tracking.dbmodels.models import SqlMetric
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError:  # pragma: no cover - depends on MLflow's layout
            return None
        if not isinstance(store, SqlAlchemyStore) or store.engine.dialect.name != "sqlite":
            return None
        cols = SqlMetric.__table__.columns
        fits = {c.name for c in cols} >= set(cls._COLUMNS) and all(
            c.name in cls._COLUMNS or c.nullable or c.default is not None or c.server_default is not None
            for c in cols
        )
        if not fits or not all(hasattr(store, n) for n in cls._NEEDS):
            return None
        return cls(store, SqlMetric.__table__)

    def write(self, run_id: str, recs: list[dict[str, Any]]) -> None:
        from types import SimpleNamespace

        sanitize = self.store.sanitize_metric_value
        rows = []
        latest: dict[str, tuple[int, int, float, bool]] = {}
        for r in recs:
            key, step, ts = r["key"], r["step"], r["timestamp"]
            is_nan, value = sanitize(r["value"])
            rows.append((key, value, ts, run_id, step, is_nan))
            best = latest.get(key)
            if best is None or (step, ts, value) > best[:3]:
                latest[key] = (step, ts, value, is_nan)
        candidates = [
            SimpleNamespace(run_uuid=run_id, key=k, step=s, timestamp=t, value=v, is_nan=n)
            for k, (s, t, v, n) in latest.items()
        ]
        try:
            writing = self.store.ManagedSessionMaker(read_only=False)
        except TypeError:  # an MLflow before read-only sessions: every session writes
            writing = self.store.ManagedSessionMaker()
        with writing as session:
            self.store._check_run_is_active(self.store._get_run(run_uuid=run_id, session=session))
            # the driver's executemany, in the session's transaction: no per-row ORM or
            # SQLAlchemy parameter processing
            session.connection().exec_driver_sql(self._sql, rows)
            self.store._update_latest_metrics_if_necessary(candidates, session)


def _sql_has_key(store: Any, exp_ids: list[str], key: str) -> bool | None:
    """Whether any run of the experiments carries source key ``key``, asked of an
    in-process SQL store's own tables in one query; None where that cannot be asked (a
    store of another kind, or an MLflow whose models differ): then search_runs answers."""
    try:
        from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:  # pragma: no cover - depends on MLflow's layout
        return None
    if not isinstance(store, SqlAlchemyStore):
        return None
    try:
        ids = [int(e) for e in exp_ids]
        with store.ManagedSessionMaker() as session:
            hit = (
                session.query(SqlTag.run_uuid)
                .join(SqlRun, SqlRun.run_uuid == SqlTag.run_uuid)
                .filter(SqlTag.key == mc.TAG_SOURCE_KEY, SqlTag.value == key, SqlRun.experiment_id.in_(ids))
                .first()
            )
    except Exception:  # any doubt: let MLflow's own search decide
        return None
    return hit is not None


def _fingerprint(payload: RunPayload) -> str:
    """The source content digest plus our mapping version: a change to either re-imports."""
    return f"{payload.content_digest()[:40]}.m{MAPPING_VERSION}"


def _records(batch: pa.RecordBatch, plan: _Plan, model_ids: dict[str, str]) -> list[dict[str, Any]]:
    """A batch of neutral points as MLflow metric dicts, column-wise rather than per point."""
    enc = batch.column("key").dictionary_encode()
    keys = pa.array([plan.metric_key(k) for k in enc.dictionary.to_pylist()], pa.string())
    micros = batch.column("timestamp").cast(pa.int64())
    millis = pc.divide(micros, 1000)
    if pc.any(pc.not_equal(pc.multiply(millis, 1000), micros)).as_py():
        plan.once(
            "timestamp-truncated",
            "metrics.timestamp",
            "MLflow keeps milliseconds; sub-millisecond parts of timestamps were dropped",
        )
    if pc.any(pc.is_inf(batch.column("value"))).as_py():
        plan.once("value-clamped", "metrics.value", "MLflow stores +/-Infinity as +/-1.7976931348623157e308")
    cols = {
        "key": keys.take(enc.indices),
        "value": batch.column("value"),
        "timestamp": millis,
        "step": batch.column("step"),
    }
    recs = pa.table(cols).to_pylist()
    models = batch.column("model_key")
    if models.null_count < len(models):
        names = batch.column("dataset_name").to_pylist()
        digests = batch.column("dataset_digest").to_pylist()
        for i, m in enumerate(models.to_pylist()):
            model_id = model_ids.get(m) if m else None
            if model_id:
                recs[i].update(model_id=model_id, dataset_name=names[i], dataset_digest=digests[i])
            elif m:
                plan.once(
                    "model-link-dropped",
                    "metrics.model_key",
                    f"points linked to {m}, which is not in the destination, "
                    "were logged to the run without the link",
                )
    return recs


def _json_point(r: dict[str, Any]) -> dict[str, Any]:
    """Protobuf JSON has no NaN or Infinity literals: they travel as strings."""
    v = r["value"]
    if math.isfinite(v):
        return r
    return {**r, "value": "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")}


def _vkey(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else repr(float(v))


def _chunks_by_size(items: list[Any], max_count: int, max_bytes: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    size = 0
    for it in items:
        n = len(it.key) + len(str(it.value)) + 64
        if chunk and (len(chunk) >= max_count or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(it)
        size += n
    if chunk:
        yield chunk


def extras_of(payload: RunPayload) -> dict[str, Any] | None:
    """The run's data that MLflow has no field for, as one JSON document (None if empty)."""
    arts = [a for a in payload.artifacts if a.row["type"] not in ("run-files", "mlflow.logged_model")]
    own = {a.row["artifact_key"] for a in payload.artifacts if a.row["type"] == "mlflow.logged_model"}
    usage = [u for u in payload.artifact_usage.to_pylist() if u["artifact_key"] not in own]
    run = {
        k: payload.run[k]
        for k in ("fork_parent_run_key", "fork_step", "step_scale")
        if payload.run.get(k) is not None
    }
    if not (arts or usage or run or payload.summary.num_rows):
        return None
    return {
        "version": 1,
        "run": run,
        "summary": [{"path": r["path"], "value_json": r["value_json"]} for r in payload.summary.to_pylist()],
        "artifacts": [
            {
                "row": a.row,
                "files": [
                    {"path": f.path, "size": f.size, "sha256": f.sha256, "uri": f.uri} for f in a.files
                ],
            }
            for a in arts
        ],
        "usage": [{"artifact_key": u["artifact_key"], "direction": u["direction"]} for u in usage],
    }


def _sendable(files: list[Any]) -> list[Any]:
    """Files with bytes to upload; references (s3://…) stay where they are."""
    return [f for f in files if not (f.uri and f.sha256 is None)]


def _under(art: ArtifactPayload, folder: str) -> ArtifactPayload:
    """The same artifact with its files placed under ``folder`` (references stay out)."""
    files = [dataclasses.replace(f, path=f"{folder}/{f.path}") for f in _sendable(art.files)]
    return ArtifactPayload(row=art.row, files=files)


def _upload_missing(art: ArtifactPayload, lister: Any, log: Any, report: RunReport | None) -> None:
    """Upload the files the destination lacks (same path and size counts as present)."""
    have = {fi.path: fi.file_size for fi in mc.walk_artifacts(lister)} if lister else {}
    for f in art.files:
        if f.path in have and (f.size is None or have[f.path] == f.size):
            continue
        with f.fetch() as local:
            _upload_one(local, f.path, log)
        if report is not None:
            report.files += 1
            report.bytes += int(f.size or 0)


def _upload_one(local: str, rel: str, log: Any) -> None:
    """Upload ``local`` so that it lands at ``rel``; MLflow names files by their basename."""
    folder, name = posixpath.split(rel)
    if os.path.basename(local) == name:
        log(local, folder or None)
        return
    with temp_dir() as d:
        link = d / name
        try:
            os.symlink(os.path.abspath(local), link)
        except OSError:
            import shutil

            shutil.copyfile(local, link)
        log(str(link), folder or None)


def _fit_alias(alias: str, where: str, report: Any) -> str | None:
    """MLflow's alias rules: ``[\\w-]``, at most 255 characters, not ``latest`` or ``v<N>``
    (those name versions). W&B allows more; what cannot be kept is reported."""
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        report.mapped("alias-skipped", where, "MLflow reserves it for versions")
        return None
    fitted = re.sub(r"[^\w-]", "_", alias)[:255]
    if fitted != alias:
        report.mapped("alias-renamed", where, f"written as {fitted!r}")
    return fitted or None


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")
