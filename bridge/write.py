"""The one safe way a run is written into any destination.

Every destination keeps the same promises: a run is found by its source key, never
created twice; an unchanged run is not touched; a dry run writes nothing and still says
what would change; the fingerprint that marks a run complete is written last, so a run
whose write was killed is completed by the next import; the source's change token is
kept only after the registry step. ``RunWriter.write_run`` is that protocol, once. A
destination fills in small primitives: ``find`` (what it holds for a source key),
``settle`` (the run as it is now, made if missing, under whatever lock it has),
``write`` (everything but the fingerprint) and ``seal`` (the fingerprint).

The fingerprint is the source's content digest plus the writer's format version. When
the destination holds no run yet, it is not needed before writing, so it is computed
while the metrics stream into the destination (``Fingerprint``), not by reading every
point twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import pyarrow as pa
from trackbridge.model import RunPayload, digest_head, digest_tail

NEW, UPDATED, UNCHANGED = "new", "updated", "unchanged"


@dataclass
class Found:
    """What a destination holds for one source run."""

    id: str  # the destination's own id for it
    fingerprint: str | None  # the one it was sealed with; None: never completed
    current: bool = True  # the destination's own state agrees too (e.g. not deleted when live)
    existed: bool = True  # False: ``settle`` has just made it
    state: Any = None  # the destination's handle (an MLflow Run, a list of folders…)


@dataclass
class Attempt:
    """What one write learnt, for a destination that must decide after a failure
    whether another writer finished the run meanwhile."""

    found: Found | None = None
    fingerprint: str | None = None


class Fingerprint:
    """A run's content digest, computed at most once and, where it can be, while its
    metrics stream past on their way into the destination.

    ``stream(payload)`` gives the payload to write with: its metrics, on their first
    full pass, feed the digest. ``value`` finishes the digest from that pass, or reads the
    run when no pass was made (or it stopped early)."""

    def __init__(self, payload: RunPayload, version: str) -> None:
        self.payload = payload
        self.version = version
        self._value: str | None = None
        self._hash: Any = None
        self._complete = False

    @property
    def value(self) -> str:
        if self._value is None:
            p = self.payload
            if p.fingerprint is not None:
                digest = p.fingerprint
            elif self._complete:
                digest_tail(self._hash, p)
                digest = self._hash.hexdigest()
            else:
                digest = p.content_digest()
            self._value = f"{digest[:40]}.{self.version}"
        return self._value

    def stream(self, payload: RunPayload) -> RunPayload:
        if payload.fingerprint is not None or self._value is not None:
            return payload
        metrics = payload.metrics

        def hashed() -> Iterator[pa.RecordBatch]:
            first = self._hash is None
            if first:
                self._hash = digest_head(payload)
            for b in metrics():
                if first:
                    self._hash.update(b.serialize())
                yield b
            if first:
                self._complete = True

        return replace(payload, metrics=hashed)


def count_points(payload: RunPayload) -> int:
    return sum(b.num_rows for b in payload.metrics())


class RunWriter(ABC):
    """The write template. Subclasses set ``FORMAT`` (bumped when what they write for
    the same source changes, so every run is written again once) and ``dry_run``, and
    fill in the primitives. ``attempt`` is the protocol and not theirs to change; a
    writer may wrap it (MLflow's ``write_run`` tries once more after a concurrent insert)."""

    FORMAT: ClassVar[str] = "v1"
    # whether the destination keeps the source's change token with each run (so a sync
    # can skip a run unread); such a writer fills in ``token_of`` and ``store_token``
    KEEPS_TOKENS: ClassVar[bool] = False
    dry_run: bool = False

    # -- primitives

    @abstractmethod
    def find(self, payload: RunPayload, report: Any) -> Found | None:
        """The run this destination holds for ``payload.key`` (from an index read once)."""

    def exclusive(self, payload: RunPayload) -> AbstractContextManager[Any]:
        """Held from the fresh look to the seal: a lock where the destination has one."""
        return nullcontext()

    @abstractmethod
    def settle(self, payload: RunPayload, found: Found | None, report: Any) -> Found:
        """The run as it is now, under ``exclusive``: looked up afresh (another writer
        may have made or finished it), and made when missing (``existed=False``)."""

    def fit(self, payload: RunPayload, found: Found | None, report: Any) -> Any:
        """Keys and values fitted to the destination's limits, each change reported; runs
        in a dry run too, so it says what a real one would map."""
        return None

    @abstractmethod
    def write(self, payload: RunPayload, run: Found, plan: Any, report: Any) -> None:
        """Everything but the fingerprint. ``payload.metrics`` feeds the fingerprint:
        read it once, in full, where possible."""

    @abstractmethod
    def seal(self, payload: RunPayload, run: Found, fingerprint: str, report: Any) -> None:
        """Mark the run complete with ``fingerprint``: the last write of a run."""

    def unchanged(self, payload: RunPayload, run: Found, report: Any) -> None:  # noqa: B027 (optional)
        """A run already complete with this content: remember what later steps need."""

    def token_of(self, run: Found) -> str | None:
        """The change token the destination keeps with ``run``."""
        return None

    def store_token(self, run_id: str, token: str) -> None:
        """Keep ``token`` with the run: called by ``write_tokens`` only."""
        raise NotImplementedError

    # -- change tokens, kept until the registry step is through

    def _keep_token(self, run_id: str, payload: RunPayload) -> None:
        if not self.KEEPS_TOKENS or not payload.token or self.dry_run:
            return
        if payload.run.get("lifecycle") == "deleted":
            return  # a deleted run takes no tags; the next sync reads it (cheaply) again
        pending = self.__dict__.setdefault("_tokens", {})
        pending[run_id] = payload.token  # one key a run: safe from several worker threads

    def write_tokens(self, registry_ok: bool) -> None:
        """Keep every run's change token, after the registry step and only if it went
        through: a sync killed or failed before it reads those runs again next time, and
        registers their models then, instead of skipping them for good."""
        pending = self.__dict__.pop("_tokens", {})
        if registry_ok and pending:
            self.store_tokens(pending)

    def store_tokens(self, tokens: dict[str, str]) -> None:
        """Keep many runs' tokens: one by one, unless the destination can do better."""
        for run_id, token in tokens.items():
            self.store_token(run_id, token)

    # -- the protocol

    def write_run(self, payload: RunPayload, report: Any) -> str:
        return self.attempt(payload, report, Attempt())

    def attempt(self, payload: RunPayload, report: Any, attempt: Attempt) -> str:
        fp = Fingerprint(payload, self.FORMAT)
        attempt.fingerprint = None
        found = self.find(payload, report)
        if found is not None:
            report.destination_id = found.id
            if self._complete(found, fp):
                self._unchanged(payload, found, report)
                return UNCHANGED
        plan = self.fit(payload, found, report)
        if self.dry_run:
            report.points = count_points(payload)
            return UPDATED if found is not None else NEW
        with self.exclusive(payload):
            run = self.settle(payload, found, report)
            attempt.found = run
            report.destination_id = run.id
            if run.existed and run is not found and self._complete(run, fp):
                self._unchanged(payload, run, report)  # another writer finished it meanwhile
                return UNCHANGED
            if run.existed:
                attempt.fingerprint = fp.value  # known before: the run was there to compare
            self.write(payload if run.existed else fp.stream(payload), run, plan, report)
            attempt.fingerprint = fp.value
            self.seal(payload, run, fp.value, report)
        self._keep_token(run.id, payload)
        return UPDATED if run.existed else NEW

    def _unchanged(self, payload: RunPayload, run: Found, report: Any) -> None:
        self.unchanged(payload, run, report)
        if self.token_of(run) != payload.token:
            # the same content under a new token (a file touched, or imported by
            # migrate): keep it, so the next sync skips this run unread
            self._keep_token(run.id, payload)

    @staticmethod
    def _complete(run: Found, fp: Fingerprint) -> bool:
        return run.current and run.fingerprint is not None and run.fingerprint == fp.value
