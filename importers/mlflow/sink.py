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

import json
import re
import threading
from typing import Any

from trackbridge import native, schema
from trackbridge.errors import DestinationError, UsageError, first_line
from trackbridge.importers.mlflow.bulk import Routed
from trackbridge.importers.mlflow.files import (
    FilesWriter,
    under,
)
from trackbridge.importers.mlflow.grouped import BULK_ERRORS, GroupedRuns, retry_api
from trackbridge.importers.mlflow.identity import RunIdentity
from trackbridge.importers.mlflow.models import ModelsWriter
from trackbridge.importers.mlflow.native import NativeWriter, plan_native
from trackbridge.importers.mlflow.plan import (
    MAPPING_VERSION,
    MAX_BATCH_BYTES,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    Plan,
    key_collation,
)
from trackbridge.importers.mlflow.points import (
    PointsWriter,
    SqlPoints,
    chunks_by_size,
)
from trackbridge.model import RunPayload
from trackbridge.report import RunReport
from trackbridge.trackers.mlflow import common as mc
from trackbridge.write import Attempt, Fingerprint, Found, RunWriter

# How SQLite, PostgreSQL and MySQL word a second insert of one row (a param that another
# importer wrote into the same run a moment before), through MLflow's store or server
_CONFLICT = re.compile(r"UNIQUE constraint|unique constraint|Duplicate entry|IntegrityError", re.IGNORECASE)


class MlflowSink(GroupedRuns, RunIdentity, PointsWriter, FilesWriter, ModelsWriter, NativeWriter, RunWriter):
    # the fingerprint's version: the source content digest plus this; a change re-imports
    FORMAT = f"m{MAPPING_VERSION}"
    KEEPS_TOKENS = True
    CHILDREN_WAIT_FOR_PARENTS = True  # mlflow.parentRunId holds the parent's run id

    def __init__(
        self,
        tracking_uri: str,
        safe: str | None = None,
        dry_run: bool = False,
        artifact_root: str | None = None,
    ) -> None:
        self.uri = tracking_uri
        self.artifact_root = mc.artifact_root_uri(artifact_root) if artifact_root else None
        self.safe = safe or tracking_uri
        self.dry_run = dry_run
        try:
            self.client = mc.client(tracking_uri)
            store = mc.store_of(self.client)
        except mc.StoreUnreachable as e:
            raise DestinationError(f"{self.describe()}: cannot write ({e})") from e
        self._lock = threading.Lock()
        self._exp_ids: dict[str, str | None] = {}
        self._deleted_projects: list[str] = []
        self._index: dict[str, dict[str, Any]] = {}
        self._model_index: dict[str, dict[str, Any]] = {}
        self._run_ids: dict[str, str] = {}
        self._model_ids: dict[str, str] = {}
        self._source_models: set[str] = set()  # source artifacts written as logged models
        self._artifact_dirs: dict[str, tuple[str, str]] = {}  # artifact key -> (run id, folder)
        self._registry_failed = False
        self._states: dict[str, dict[str, str]] = {}  # run id -> its TAG_STATE
        self._exp_locks: dict[str, threading.Lock] = {}
        self._creds = store.get_host_creds() if tracking_uri.startswith(("http://", "https://")) else None
        self._sql = None if self._creds is not None else SqlPoints.of(store)
        self._batch = SqlPoints.BATCH if self._sql is not None else MAX_METRICS_PER_BATCH
        # a store every trackbridge process on this machine locks the same way (SQLite, a
        # file store): a look-up and a create under its lock are exact; elsewhere the
        # creator checks again after creating (trackbridge.claims)
        self._locked_store = mc.is_locked(tracking_uri)
        self._same = key_collation(store)  # how its tables compare keys, if not as Python
        self.origin: str | None = None
        # what the sink did beyond the runs it was given (duplicates it retired), for the report
        self.notices: list[tuple[str, str, str]] = []
        # new runs into an in-process SQL store: held, then committed a group at a time
        self._bulk_setup(store, enabled=self._creds is None and not dry_run)
        if self._bulk is not None:
            self.client = Routed(self.client, self._pending)

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

    def token_of(self, run: Found) -> str | None:
        return mc.run_state(run.state.data.tags).get("token")

    def store_token(self, run_id: str, token: str) -> None:
        self._set_state(run_id, token=token)

    def finish(self) -> None:
        if self.dry_run:
            return
        self.flush()
        self.write_tokens(registry_ok=not self._registry_failed)
        for exp_id in self._deleted_projects:
            mc.change_once(
                lambda e=exp_id: self.client.delete_experiment(e),
                lambda e=exp_id: self.client.get_experiment(e).lifecycle_stage == "deleted",
            )

    # -- projects

    def check_project(self, row: dict[str, Any]) -> str | None:
        """Where a new experiment for ``row`` keeps its files (None: the store decides);
        refused where nothing would: an in-process database store has no artifact root
        of its own, and MLflow would fall back to ./mlruns in whatever folder the command
        ran in, files the production server can never serve."""
        location = mc.experiment_artifact_location(self.uri, row["name"], self.artifact_root)
        unplaced = location is None and mc.is_database(self.uri) and not self.dry_run
        if unplaced and self.client.get_experiment_by_name(row["name"]) is None:
            raise UsageError(
                f"{self.describe()}: a new experiment {row['name']!r} needs a place for its "
                "files, and a database store has none of its own; pass --artifact-root "
                "(what 'mlflow server --default-artifact-root' is given), or create the "
                "experiment with its artifact location first"
            )
        return location

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
                    artifact_location=self.check_project(row),
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

    # -- runs

    def write_run(self, payload: RunPayload, report: RunReport) -> str:
        for attempt_no in (1, 2, 3):
            attempt = Attempt()
            try:
                outcome = self.attempt(payload, report, attempt)
                if attempt.found is not None:
                    self._sealed(attempt.found.id, report)  # a pending run: committed in a group
                return outcome
            except Exception as e:
                pending = attempt.found is not None and attempt.found.id in self._pending
                if pending or isinstance(e, BULK_ERRORS):
                    self._drop_pending(attempt.found.id if attempt.found else None)
                    if isinstance(e, BULK_ERRORS):
                        return retry_api(self, payload, report)
                    raise  # nothing of it reached the store
                if self._finished_by_another(payload, attempt):
                    report.mapped(
                        "written-concurrently", "runs", "another importer finished this run meanwhile"
                    )
                    return "unchanged"
                if attempt_no == 3 or attempt.found is None:
                    raise
                if not (_CONFLICT.search(str(e)) or self._retired(attempt.found.id)):
                    raise
                # another importer is writing the same run right now (two machines, no shared
                # lock): MLflow refuses the second insert of a param, or the other importer
                # found our copy second and retired it; read the run afresh (the keeper) and
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

    def _retired(self, run_id: str) -> bool:
        """Whether another importer, which created the same run at the same moment, kept
        its own copy and retired ours (``_keep_one``) while we wrote into it."""
        try:
            return mc.TAG_DUPLICATE_OF in self.client.unwrapped.get_run(run_id).data.tags
        except Exception:
            return False

    def _finished_by_another(self, payload: RunPayload, attempt: Attempt) -> bool:
        """A write that failed because another importer wrote the same run at the same
        time (it finished first, and deleted it as the source has it) is no failure: the
        run is complete, as the fingerprint it now carries says."""
        if attempt.found is None:
            return False
        try:
            r = self.client.unwrapped.get_run(attempt.found.id)
        except Exception:
            return False
        fp = attempt.fingerprint or Fingerprint(payload, self.FORMAT).value
        return (
            mc.run_state(r.data.tags).get("fingerprint") == fp
            and r.info.lifecycle_stage == (payload.run.get("lifecycle") or "active")
            and mc.TAG_DUPLICATE_OF not in r.data.tags
        )

    # -- the write template's primitives (trackbridge.write)

    def _found(self, r: Any, payload: RunPayload, existed: bool = True) -> Found:
        state = mc.run_state(r.data.tags)
        with self._lock:
            self._states[r.info.run_id] = state
        return Found(
            r.info.run_id,
            state.get("fingerprint"),
            current=r.info.lifecycle_stage == (payload.run.get("lifecycle") or "active"),
            existed=existed,
            state=r,
        )

    def find(self, payload: RunPayload, report: RunReport) -> Found | None:
        exp_id = self._exp_ids.get(payload.run["project_key"])
        if exp_id is None and not self.dry_run:
            raise DestinationError(
                f"run {payload.key}: its project {payload.run['project_key']} was not imported"
            )
        existing = self._runs_index(exp_id).get(payload.key) if exp_id else None
        return None if existing is None else self._found(existing, payload)

    def settle(self, payload: RunPayload, found: Found | None, report: RunReport) -> Found:
        if found is not None:
            return found
        if self._bulk_fits(payload):
            # made in memory; whether another importer made it meanwhile is asked when
            # its group is committed (GroupedRuns._commit)
            return self._found(self._pend(payload), payload, existed=False)
        # the index was read once; another importer may have made the run since
        got, made = self._find_or_create(self._exp_ids[payload.run["project_key"]], payload)
        return self._found(got, payload, existed=not made)

    def unchanged(self, payload: RunPayload, run: Found, report: RunReport) -> None:
        with self._lock:
            self._run_ids[payload.key] = run.id
        self._remember_artifact_dirs(payload, run.id)
        exp_id = self._exp_ids.get(payload.run["project_key"])
        for a in payload.artifacts:
            if (a.row["type"] == schema.LOGGED_MODEL or native.is_model(a.row)) and exp_id:
                # (a model a run imported before 0.2 has no logged model: its files are the run's)
                m = self._models_index(exp_id).get(a.row["artifact_key"])
                if m is not None:
                    with self._lock:
                        self._model_ids[a.row["artifact_key"]] = m.model_id
                        if native.is_model(a.row):
                            self._source_models.add(a.row["artifact_key"])

    def fit(self, payload: RunPayload, found: Found | None, report: RunReport) -> Any:
        plan = Plan(report, native.system_of(payload.key), self._same)
        params = plan.params(payload.params)
        tags = plan.tags(payload.tags, payload.run)
        shown = plan_native(payload, tags, report)
        tags.update(shown.tags)
        return plan, params, tags, shown

    def write(self, payload: RunPayload, found: Found, fitted: Any, report: RunReport) -> None:
        plan, params, tags, shown = fitted
        run, key, run_id = payload.run, payload.key, found.id
        existing = found.state if found.existed else None
        exp_id = self._exp_ids[run["project_key"]]
        if existing is None:
            have_params: dict[str, str] = {}
            have_tags: dict[str, str] = dict(found.state.data.tags)
            have_metric_keys: set[str] = set()
        else:
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
        self._remember_artifact_dirs(payload, run_id)
        self._write_fields(run_id, run, params, tags, have_params, have_tags, report)
        for art in payload.artifacts:
            if art.row["type"] == schema.LOGGED_MODEL:
                self._write_logged_model(art, exp_id, run_id, report)
        self._write_metrics(run_id, payload, plan, have_metric_keys if existing else None, report)
        previous = self._previous_native(run_id, self._states.get(run_id, {})) if existing else {}
        self._show_natively(run_id, payload, plan, shown, previous, existing is not None, report)
        for art in payload.artifacts:
            if art.row["type"] == "run-files":
                self._upload_run_files(run_id, art, existing is not None, report)
            elif native.is_model(art.row):
                self._write_source_model(art, exp_id, run_id, report)
            elif art.row["type"] != schema.LOGGED_MODEL:
                placed = under(art, mc.artifact_dir(art.row))
                self._upload_run_files(run_id, placed, existing is not None, report)
        self._write_datasets(run_id, payload.dataset_inputs, existing)
        extras = self._write_extras(run_id, payload, report, shown.done(previous), plan.kept)
        mapped = None
        if plan.mapping_needed():
            text = json.dumps(plan.mapping, indent=1, ensure_ascii=False)
            self.client.log_text(run_id, text, f"{mc.MAPPING_DIR}/mapping.json")
            mapped = str(len(report.mappings))

        status = mc.TO_MLFLOW_STATUS.get(run.get("status") or "finished", "FINISHED")
        if existing is not None and run.get("name") and existing.info.run_name != run["name"]:
            self.client.update_run(run_id, name=run["name"])  # renamed in the source since
        if status in ("FINISHED", "FAILED", "KILLED") and run.get("end_time") is not None:
            self.client.set_terminated(run_id, status, end_time=mc.dt_to_ms(run.get("end_time")))
        else:
            self.client.update_run(run_id, status=status)
        self._set_state(run_id, False, source=self.origin, extras="1" if extras else None, mapped=mapped)
        stale = set(previous.get("tags") or []) - set(shown.summary_tags)
        self._forget_stale_tags(run_id, have_tags, tags, stale)

    def _write_fields(
        self,
        run_id: str,
        run: dict[str, Any],
        params: dict[str, str],
        tags: dict[str, str],
        have_params: dict[str, str],
        have_tags: dict[str, str],
        report: RunReport,
    ) -> None:
        """The params and tags the run lacks (MLflow params cannot change: a changed one is
        reported, the destination keeps its value), and its parent."""
        parent = schema.depends_on(run)  # its parent, or the search it is a trial of
        if parent:
            pid = self._find_run_id(parent)
            if pid:
                tags[mc.TAG_PARENT] = pid
            else:
                report.mapped(
                    "parent-missing",
                    "runs.parent_run_key" if run.get("parent_run_key") else "runs.sweep_key",
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

    def seal(self, payload: RunPayload, found: Found, fingerprint: str, report: RunReport) -> None:
        run_id = found.id
        self._set_state(run_id, fingerprint=fingerprint)
        # an earlier trackbridge's separate bookkeeping tags, now in the state just written
        for tag in mc.LEGACY_STATE_TAGS:
            if tag in found.state.data.tags:
                self._delete_tag(run_id, tag)
        if payload.run.get("lifecycle") == "deleted":
            # After the marker: MLflow refuses writes to a deleted run. A kill in between
            # is caught by the lifecycle check (Found.current) of the next import.
            mc.change_once(
                lambda: self.client.delete_run(run_id),
                lambda: self.client.get_run(run_id).info.lifecycle_stage == "deleted",
            )

    def _forget_stale_tags(
        self, run_id: str, have: dict[str, str], wanted: dict[str, str], stale: set[str]
    ) -> None:
        """Tags an earlier import set from run state the source no longer has: a run no
        longer incomplete or crashed, a W&B tag or summary text removed (``stale``). Left
        alone, they would lie."""
        derived = (mc.TAG_INCOMPLETE, mc.TAG_SOURCE_STATUS)
        for k in have:
            if k not in wanted and (k in derived or k in stale or k.startswith(mc.LABEL_PREFIX)):
                self._delete_tag(run_id, k)

    def _delete_tag(self, run_id: str, key: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_tag(run_id, key)
        except MlflowException as e:
            # gone already: a retried delete whose first answer was lost
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def _remember_artifact_dirs(self, payload: RunPayload, run_id: str) -> None:
        """Where each source artifact's files go in the run, for model versions made from them."""
        with self._lock:
            for a in payload.artifacts:
                if a.row["type"] not in ("run-files", schema.LOGGED_MODEL):
                    self._artifact_dirs[a.row["artifact_key"]] = (run_id, mc.artifact_dir(a.row))

    def _log_params_tags(self, run_id: str, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        items = [Param(k, v) for k, v in params.items()] + [RunTag(k, v) for k, v in tags.items()]
        for chunk in chunks_by_size(items, MAX_PARAMS_TAGS_PER_BATCH, MAX_BATCH_BYTES):
            self.client.log_batch(
                run_id,
                params=[x for x in chunk if isinstance(x, Param)],
                tags=[x for x in chunk if isinstance(x, RunTag)],
                synchronous=True,
            )

    # -- MLflow 3 logged models

    # -- registry
