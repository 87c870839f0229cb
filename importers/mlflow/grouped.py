"""The MLflow writer's side of the bulk path (``trackbridge.importers.mlflow.bulk``):
which runs take it, when a group of them is committed, and what happens when another
importer made one of them meanwhile or a commit fails."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from trackbridge import claims, native, schema
from trackbridge.errors import first_line
from trackbridge.importers.mlflow.bulk import MAX_POINTS, BulkStore, NotBulk, PendingRun, new_pending
from trackbridge.model import RunPayload
from trackbridge.trackers.mlflow import common as mc
from trackbridge.write import Attempt

GROUP_RUNS = 200  # runs in one transaction at most...
GROUP_POINTS = 100_000  # ...and points: a few seconds of writing, rolled back cleanly


class Conflict(Exception):
    """Another importer committed the same source run first: write it the API way."""


class GroupedRuns:
    """New runs held in memory and committed a group at a time (``flush``)."""

    def _bulk_setup(self, store: Any, enabled: bool) -> None:
        self._pending: dict[str, PendingRun] = {}
        self._api_only: set[str] = set()  # runs that must go the API way (a conflict, a model)
        self._experiments: dict[str, Any] = {}
        self._bulk: BulkStore | None = None
        if enabled:
            check = BulkStore.check(store)
            if check.ok:
                self._bulk = BulkStore(store)
            elif check.why:
                self.notices.append(("bulk-path-off", "-", f"written through MLflow's API: {check.why}"))

    def _bulk_fits(self, payload: RunPayload) -> bool:
        """A new run with nothing that needs MLflow's API: logged models stay on it."""
        return (
            self._bulk is not None
            and payload.key not in self._api_only
            and not any(
                a.row["type"] == schema.LOGGED_MODEL or native.is_model(a.row) for a in payload.artifacts
            )
        )

    def _pend(self, payload: RunPayload) -> Any:
        """The run, made in memory as ``_find_or_create`` makes it in the store."""
        exp_id = self._exp_ids[payload.run["project_key"]]
        exp = self._experiments.get(exp_id)
        if exp is None:
            exp = self._experiments[exp_id] = self.client.get_experiment(exp_id)
        tags = {
            mc.TAG_USER: payload.run.get("user") or "",
            mc.TAG_SOURCE_KEY: payload.key,
            mc.TAG_STATE: mc.state_text({"claim": claims.new_claim()}),
        }
        run = new_pending(self._bulk.store, exp, payload, tags, mc.display_name(payload.run))
        with self._lock:
            self._pending[run.run_id] = run
        return run.get_run()

    def _pending_points(self, run: PendingRun, points: list[dict[str, Any]] | pa.Table) -> None:
        if isinstance(points, pa.Table):
            run.points.add(points)
        else:
            run.points.add_records(points)
        if run.points.count > MAX_POINTS:
            # too large to hold: committed now as an unfinished run (RUNNING, no
            # fingerprint), the rest of it through the API as any resumed run
            self._commit([run], alone=True)

    def _drop_pending(self, run_id: str | None) -> None:
        with self._lock:
            run = self._pending.pop(run_id, None)  # type: ignore[arg-type]
            if run is not None:  # its id was never committed: nothing may point at it
                self._run_ids.pop(run.payload.key, None)

    def _sealed(self, run_id: str, report: Any) -> None:
        run = self._pending.get(run_id)
        if run is not None:
            run.sealed, run.report = True, report
            self.flush(full_only=True)

    def flush(self, full_only: bool = False) -> None:
        """Commit the sealed pending runs (only once a group is full, with ``full_only``)."""
        with self._lock:
            ready = [r for r in self._pending.values() if r.sealed]
            if full_only and len(ready) < GROUP_RUNS and sum(r.points.count for r in ready) < GROUP_POINTS:
                return
            for r in ready:
                del self._pending[r.run_id]
        if ready:
            self._commit(ready)

    def _commit(self, runs: list[PendingRun], alone: bool = False) -> None:
        """One transaction for ``runs``, under the store's lock (every store the bulk path
        writes has one that reaches all machines), so the look for runs another importer
        made first is exact; those are written again the API way, into that importer's
        run. A failed group is tried run by run."""
        assert self._bulk is not None
        keys = [r.payload.key for r in runs]
        exps = {r.experiment_id for r in runs}
        try:
            with mc.store_lock(self.uri), self._bulk.session() as session:
                taken = self._bulk.taken(session, exps, keys)
                if alone and taken:
                    raise Conflict(keys[0])
                self._bulk.insert(session, [r for r in runs if r.payload.key not in taken])
        except Exception as e:
            if alone:
                raise  # the write of that one run fails (or, on a Conflict, goes the API way)
            if len(runs) == 1:
                self._failed(runs[0], e)
            else:
                for r in runs:
                    self._commit([r])
            return
        if alone:
            with self._lock:
                self._pending.pop(runs[0].run_id, None)
        with self._lock:  # before any is written again: a child must find its parent anew
            for r in runs:
                if r.payload.key in taken:
                    self._run_ids.pop(r.payload.key, None)
        for r in runs:
            if r.payload.key in taken:
                self._again(r)

    def _again(self, run: PendingRun) -> None:
        """Write a run another importer committed first through the API: into its run,
        adding only what that one lacks (usually nothing). (``_commit`` has forgotten the
        id it held for it, which was never committed.)"""
        report = run.report
        report.points = report.files = report.bytes = 0
        report.mappings.clear()
        self._api_only.add(run.payload.key)
        try:
            report.outcome = self.write_run(run.payload, report)
        except Exception as e:
            self._failed(run, e)

    def _failed(self, run: PendingRun, e: BaseException) -> None:
        report = run.report
        with self._lock:
            self._run_ids.pop(run.payload.key, None)
            getattr(self, "_tokens", {}).pop(run.run_id, None)
        if report is not None:
            report.outcome, report.error = "failed", f"{type(e).__name__}: {first_line(e)}"

    def store_tokens(self, tokens: dict[str, str]) -> None:
        """Every run's change token in one transaction on a SQL store, not one each."""
        if self._bulk is None:
            return super().store_tokens(tokens)  # type: ignore[misc]
        states = {}
        with self._lock:
            for run_id, token in tokens.items():
                self._states[run_id] = {**self._states.get(run_id, {}), "token": token}
                states[run_id] = mc.state_text(self._states[run_id])
        with self._bulk.session() as session:
            self._bulk.set_tag_values(session, mc.TAG_STATE, states)


def retry_api(sink: Any, payload: RunPayload, report: Any) -> str:
    """A pending run that turned out to need MLflow's API (``NotBulk``, ``Conflict``):
    forgotten, and written the API way from the start."""
    sink._api_only.add(payload.key)
    report.points = report.files = report.bytes = 0
    report.mappings.clear()
    return sink.attempt(payload, report, Attempt())


BULK_ERRORS = (NotBulk, Conflict)
