"""One destination of a dual-logging run, in a thread of its own: fed live while it keeps
up (a destination that takes points as they come), completed from the spool when the
run finishes, so a destination that is slow, down or killed never slows training and
never loses a point.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from trackbridge import schema
from trackbridge.errors import first_line
from trackbridge.model import project_row
from trackbridge.report import RunReport, scrub
from trackbridge.trackers.wandb import common as wc

if TYPE_CHECKING:
    from trackbridge.shim import Run

_COMPLETING = threading.Lock()


class Backend:
    """One destination: fed live while it keeps up, completed from the spool at the end."""

    def __init__(self, run: Run, uri: str) -> None:
        from trackbridge.uri import parse, redact

        self.run = run
        self.uri = uri
        self.safe = redact(uri)
        t = parse(uri)
        # a destination that takes points while the run runs is fed live; others (W&B
        # offline run folders) are written whole at finish
        self.live = t.tracker.capabilities.live_append
        self.q: collections.deque[pa.RecordBatch] = collections.deque()
        self.queued = 0
        self.fed = self.live  # False once it failed or fell behind: the spool catches it up
        self.error: str | None = None
        self.done = False
        self._wake = threading.Event()
        self._closing = False
        self.thread = threading.Thread(target=self._loop, name=f"trackbridge-{self.safe}", daemon=True)
        self.thread.start()

    def offer(self, rb: pa.RecordBatch) -> None:
        if not self.fed:
            return
        if self.queued + rb.num_rows > self.run._backlog:
            self._stop_feeding("fell more than the backlog behind")
            return
        self.q.append(rb)
        self.queued += rb.num_rows
        self._wake.set()

    def _stop_feeding(self, why: str) -> None:
        self.fed = False
        self.q.clear()
        self.queued = 0
        warn_once(
            self.run,
            self.safe,
            f"{self.safe} {why}; training goes on and every point stays in the spool for finish(), "
            f"or for: trackbridge sync spool://{self.run.dir.parent} {self.safe}",
        )

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def _loop(self) -> None:
        sink = run_id = None
        try:
            if self.live:
                sink, run_id = self._start()
        except Exception as e:
            self.error = first_line(e)
            self._stop_feeding(f"could not be reached ({scrub(self.error)})")
        while True:
            self._wake.wait(0.05)
            self._wake.clear()
            while self.q:
                rb = self.q.popleft()
                self.queued -= rb.num_rows
                if not self.fed or sink is None:
                    continue
                points = metric_batch(self.run.key, rb)
                if points is None:
                    continue
                try:
                    sink.append_points(run_id, points)
                except Exception as e:
                    self.error = first_line(e)
                    self._stop_feeding(f"failed ({scrub(self.error)})")
            if self._closing and not self.q:
                break
        self._complete()

    def _start(self) -> tuple[Any, str]:
        from trackbridge.uri import open_sink

        sink = open_sink(self.uri)
        sink.begin(f"spool://{self.run.dir.parent}")
        sink.write_project(project_row(wc.project_key(self.run.project), "wandb", self.run.project))
        from trackbridge.exporters.wandb.spool import spooled_payload

        head = spooled_payload(self.run.dir, self.run._meta)
        head.metrics = lambda: iter(())
        # the spool's fingerprint names a run with its points; the head has none, so it
        # must never pass for that run (a run that ended before this destination started
        # would otherwise look complete, with no points)
        head.fingerprint = f"live-{head.fingerprint}"
        rr = RunReport(run_key=self.run.key)
        sink.write_run(head, rr)
        return sink, rr.destination_id

    def _complete(self) -> None:
        """Write the run from the spool: what the live feed missed, then the end state."""
        from trackbridge.exporters.wandb.spool import spooled_payload
        from trackbridge.uri import open_sink

        try:
            # one healthy destination at a time: each reads the whole spool, so memory at
            # the end holds one copy of the run, not one per destination. One that has
            # already failed goes on its own, so its retries never hold the others up.
            with contextlib.nullcontext() if self.error else _COMPLETING:
                sink = open_sink(self.uri)
                sink.begin(f"spool://{self.run.dir.parent}")
                sink.write_project(project_row(wc.project_key(self.run.project), "wandb", self.run.project))
                sink.write_run(spooled_payload(self.run.dir, self.run._meta), RunReport(run_key=self.run.key))
                sink.finish()
            self.done = True
        except Exception as e:
            self.error = first_line(e)

    def outcome(self) -> str:
        if self.done:
            return "complete"
        why = f" ({scrub(self.error)})" if self.error else " (still writing when the flush timeout ran out)"
        return f"behind{why}; catch up with: trackbridge sync spool://{self.run.dir.parent} {self.safe}"


def metric_batch(key: str, rb: pa.RecordBatch) -> pa.RecordBatch | None:
    """The spool batch's metric records in the neutral metrics schema (None if it has none)."""
    import pyarrow.compute as pc

    m = rb.filter(pc.equal(rb.column("kind"), "m"))
    if m.num_rows == 0:
        return None
    c = m.column
    return (
        schema.metrics_table(key, c("key"), c("step"), c("time"), c("value")).combine_chunks().to_batches()[0]
    )


def warn_once(run: Run, what: str, message: str) -> None:
    warned = run.__dict__.setdefault("_warned", set())
    if what not in warned:
        warned.add(what)
        print(f"trackbridge: warning: {scrub(message)}", file=sys.stderr)
