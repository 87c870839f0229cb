"""Retries for every tracker call that crosses a network: one policy, one classification.

A nightly job meets rate limits, restarting servers and dropped connections; it must
wait and go on, never give up on the first 503 and never hammer a server that asked
for a pause. Only transient failures are retried (429, 5xx, timeouts, resets,
refused connections while a server restarts); a 4xx such as 401 or 404 is an answer,
and retrying it would only hide it.

The wait is the server's ``Retry-After`` when we can see it, else exponential backoff
with full jitter (so many workers do not retry in lock-step), capped at ``maximum``.
Trackers' own client retries are switched off (MLflow's in ``trackers.mlflow.common``)
so that this is the only layer that retries, with limits the user sets in one place.
What only one tracker says in words (a busy SQLite file behind MLflow) its declaration
classifies (``Tracker.transient``).
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# How an HTTP client words the status once urllib3 has given up on it (requests', MLflow's)
_STATUS_IN_TEXT = re.compile(
    r"too many (\d{3}) error responses|error code (\d{3}) != 200|status code (\d{3})"
)


class HttpStatusError(Exception):
    """A response we asked for ourselves came back with an error status."""

    def __init__(self, status: int, message: str, retry_after: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status_code = status
        self.headers = {"Retry-After": retry_after} if retry_after is not None else {}


def _chain(exc: BaseException) -> list[Any]:
    """The error and what it wraps: ``.exc`` (W&B), ``__cause__``/``__context__`` (an
    MlflowException raised while handling the HTTP error that has the headers)."""
    out: list[Any] = []
    cur: Any = exc
    while cur is not None and len(out) < 6:
        out += [cur, getattr(cur, "exc", None)]
        cur = cur.__cause__ or cur.__context__
    return [o for o in out if o is not None]


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (``Retry-After``, in seconds), if it said."""
    for obj in [x for e in _chain(exc) for x in (e, getattr(e, "response", None))]:
        headers = getattr(obj, "headers", None)
        if headers is None:
            headers = getattr(getattr(obj, "response", None), "headers", None)
        value = headers.get("Retry-After") if headers else None
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return None  # an HTTP date: rare from these servers; fall back to our backoff
    return None


def status_of(exc: BaseException) -> int | None:
    for obj in _chain(exc):
        response = getattr(obj, "response", None)
        code = getattr(response, "status_code", None) or getattr(obj, "status_code", None)
        if isinstance(code, int):
            return code
    m = _STATUS_IN_TEXT.search(str(exc))
    if m:
        return int(next(g for g in m.groups() if g))
    return None


def retryable(exc: BaseException) -> bool:
    """429 and 5xx, timeouts and dropped connections; never a 4xx like 401 or 404."""
    code = status_of(exc)
    if code is not None:
        return code == 429 or code >= 500
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    mod = type(exc).__module__
    if mod.startswith(("requests", "urllib3")) and isinstance(exc, OSError):
        return True  # requests' ConnectionError/Timeout are OSErrors, not builtin ConnectionErrors
    from trackbridge import tracker

    return tracker.transient(exc)  # a tracker's own wording of "busy" or "try again"


@dataclass
class RetryPolicy:
    attempts: int = 8  # tries in all, the first one included
    initial: float = 1.0  # seconds before the first retry (then doubling), before jitter
    maximum: float = 60.0  # no single wait is longer, even when Retry-After asks for more
    retries: int = field(default=0, compare=False)
    obeyed: int = field(default=0, compare=False)  # waits a server's Retry-After decided
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def wait_for(self, exc: BaseException | None, attempt: int) -> float:
        asked = retry_after(exc) if exc else None
        if asked is not None:
            with self._lock:
                self.obeyed += 1
            return min(asked, self.maximum)
        return random.uniform(0, min(self.maximum, self.initial * 2 ** (attempt - 1)))

    def retrying(self) -> Any:
        """A tenacity ``Retrying``: the server's Retry-After, else backoff with full jitter."""
        from tenacity import Retrying, retry_if_exception, stop_after_attempt

        def wait(state: Any) -> float:
            with self._lock:
                self.retries += 1
            return self.wait_for(state.outcome.exception() if state.outcome else None, state.attempt_number)

        return Retrying(
            retry=retry_if_exception(retryable),
            stop=stop_after_attempt(self.attempts),
            wait=wait,
            reraise=True,
        )

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self.retrying()(fn, *args, **kw)


class RetryingProxy:
    """Any client object whose every method call goes through ``policy``.

    For clients whose calls are safe to repeat (MLflow's: a repeated log-batch of the
    same points is deduplicated by the store's primary key, tags and params are set to
    the same value). The few calls that create something are guarded by their callers,
    which look for the object by its source key before creating it again.
    """

    def __init__(self, target: Any, policy: RetryPolicy) -> None:
        self._target = target
        self._policy = policy

    @property
    def unwrapped(self) -> Any:
        return self._target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        policy = self._policy

        def call(*args: Any, **kw: Any) -> Any:
            return policy.call(attr, *args, **kw)

        return call


# The policy every adapter uses unless given its own; the CLI and the sync config set
# its limits once (``--retries``, ``--retry-max-wait``, ``[retry]``).
POLICY = RetryPolicy()


def configure(
    attempts: int | None = None, initial: float | None = None, maximum: float | None = None
) -> None:
    if attempts is not None:
        POLICY.attempts = attempts
    if initial is not None:
        POLICY.initial = initial
    if maximum is not None:
        POLICY.maximum = maximum
