"""Finding a run in MLflow by its source key, and never making it twice: the index read
once per experiment, the fresh look-up before a create (one indexed query on SQL
stores), claims on servers, and duplicates another importer left retired.
"""

from __future__ import annotations

import threading
from typing import Any

from trackbridge import claims
from trackbridge.errors import first_line
from trackbridge.model import RunPayload
from trackbridge.trackers.mlflow import common as mc


def sql_has_key(store: Any, exp_ids: list[str], key: str) -> bool | None:
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


def quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


class RunIdentity:
    """Runs and logged models by source key, each made once, and a run's bookkeeping."""

    def _set_state(self, run_id: str, write: bool = True, **changes: str | None) -> None:
        """Update the run's one bookkeeping tag (``TAG_STATE``), keeping what it held; with
        ``write`` False, only as this import knows it, for the seal to write.

        The tag is written at the run's creation (its claim), at the seal (everything,
        the fingerprint with it) and with the change token, never in between: two importers
        writing one run at once (two machines) then never erase each other's
        fingerprint, which is what tells the loser that the run is complete."""
        with self._lock:
            state = {**self._states.get(run_id, {}), **{k: v for k, v in changes.items() if v is not None}}
            self._states[run_id] = state
        if write:
            self.client.set_tag(run_id, mc.TAG_STATE, mc.state_text(state))

    def synced(self, project_key: str) -> dict[str, tuple[str | None, str]]:
        """Runs a completed import left in the project's experiment: source key ->
        (source token, run id). One paged search, so a sync knows what it may skip
        without a local cache: identity lives in the destination."""
        exp_id = self._exp_ids.get(project_key)
        if not exp_id:
            return {}
        light = self._synced_from_tags(exp_id)
        if light is not None:
            return light
        out = {}
        for k, r in self._runs_index(exp_id).items():
            state = mc.run_state(r.data.tags)
            if "fingerprint" in state:
                out[k] = (state.get("token"), r.info.run_id)
        return out

    def _synced_from_tags(self, exp_id: str) -> dict[str, tuple[str | None, str]] | None:
        """``synced`` from the bookkeeping tags of each run, read straight from a SQL store's tables
        (a quiet night asks for nothing more); None where the runs index must settle it:
        no such store, or a source key that two runs carry (the index retires one)."""
        bulk = getattr(self, "_bulk", None)
        if bulk is None or exp_id in self._index:
            return None
        with bulk.session() as session:
            tags = bulk.run_tags(
                session, exp_id, (mc.TAG_SOURCE_KEY, mc.TAG_STATE, mc.TAG_DUPLICATE_OF, *mc.LEGACY_STATE_TAGS)
            )
        keyed = {run_id: t for run_id, t in tags.items() if mc.TAG_SOURCE_KEY in t}
        keys = [t[mc.TAG_SOURCE_KEY] for t in keyed.values()]
        if len(set(keys)) != len(keys) or any(mc.TAG_DUPLICATE_OF in t for t in keyed.values()):
            return None
        out = {}
        for run_id, t in keyed.items():
            state = mc.run_state(t)
            if "fingerprint" in state:
                out[t[mc.TAG_SOURCE_KEY]] = (state.get("token"), run_id)
        return out

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
            lambda r: mc.run_state(r.data.tags).get("claim"),
            lambda r: r.info.run_id,
            lambda r: "fingerprint" in mc.run_state(r.data.tags),
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

        if self._creds is None and sql_has_key(self.client._tracking_client.store, exp_ids, key) is False:
            return []  # the usual answer for a new run, from one indexed query (~1 ms, not ~15)
        found = (client or self.client).search_runs(
            exp_ids,
            filter_string=f"tags.`{mc.TAG_SOURCE_KEY}` = '{quote(key)}'",
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
                        mc.TAG_STATE: mc.state_text({"claim": claims.new_claim()}),
                    },
                    run_name=mc.display_name(run),
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

    def _search_run(self, client: Any, exp_id: str, key: str) -> Any:
        """The run carrying ``key`` (deleted ones too), for a retried create_run."""
        found = self._runs_with_key([exp_id], key, client)
        return found[0] if found else None
