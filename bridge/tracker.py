"""What a tracker declares about itself, once, and how trackbridge finds the declarations.

Everything generic (URI resolution, ``--help``'s list of URIs, default parallelism,
retry classification, verify's comparison rules, the README's support table) reads
these declarations, so nothing generic names a tracker, and a tracker in another
package needs no edit here: it declares a ``Tracker`` and lists it under the
``trackbridge.trackers`` entry point group::

    [project.entry-points."trackbridge.trackers"]
    jsonl = "my_package.jsonl:TRACKER"

A declaration module must be cheap to import (the CLI loads every declaration to parse
a URI): the tracker's SDK is imported by its source and sink factories, not before.

The shape follows dlt's destination capabilities (limits and precision declared, not
discovered by failing) and Singer's narrow tap/target contract (a source yields the
neutral payloads, a sink takes them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from trackbridge.errors import UsageError

GROUP = "trackbridge.trackers"


@dataclass(frozen=True)
class Limits:
    """What a destination refuses or cuts, so that values are fitted, and the fitting
    reported, before a write instead of after a failure. None: no limit."""

    key_chars: int | None = None  # metric, param and tag keys
    key_pattern: str | None = None  # a regular expression every key must match whole
    param_value_chars: int | None = None
    tag_value_chars: int | None = None
    metrics_per_batch: int | None = None
    params_tags_per_batch: int | None = None
    batch_bytes: int | None = None
    integer_steps: bool = False  # a fractional step must be mapped
    monotonic_steps: bool = False  # points must arrive in increasing step order


@dataclass(frozen=True)
class Capabilities:
    """How a tracker behaves, as far as generic code must know."""

    time_precision_ms: int = 1  # 1: times are kept to the millisecond; 1000: to the second
    limits: Limits = field(default_factory=Limits)
    rewrites_history: bool = False  # a run's points can be replaced (else only appended)
    live_append: bool = False  # points can be appended to a run while it runs (the shim)
    local: bool = False  # an in-process store or folder: one writer gains most
    reads: bool = True
    writes: bool = True


@dataclass(frozen=True)
class Target:
    """A parsed URI: which tracker, and the location its own SDK understands."""

    name: str  # the declaring tracker's name: "mlflow", "wandb", "bundle", ...
    scheme: str  # the URI's scheme, lower case: "mlflow+postgresql+psycopg2", "wandb+offline"
    inner: str  # the URI or path the tracker's own SDK understands
    raw: str  # as the user typed it (may hold credentials: show ``safe``)

    @property
    def safe(self) -> str:
        return redact(self.raw)

    @property
    def tracker(self) -> Tracker:
        return by_name(self.name)


def redact(uri: str) -> str:
    """Drop user:password@, the query and the fragment; keep everything else byte-exact.

    (urlunsplit would also turn ``sqlite:////abs/path`` into ``sqlite://abs/path``.)
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{slash}{path}"


def local_path(rest: str) -> str:
    """``x+offline:///abs`` and ``x+offline://rel/path`` both name a local folder."""
    return str(Path(rest).expanduser()) if rest.startswith("/") else str(Path.cwd() / rest)


def _no(target: Target, **options: Any) -> Any:
    raise AssertionError(target.scheme)


@dataclass(frozen=True)
class Tracker:
    """One tracker's declaration. Only ``name``, ``schemes`` and one factory are needed;
    the rest has defaults that suit a local folder format."""

    name: str  # what reports, Target.name and source keys ("mlflow:run/…") use
    title: str  # as users spell it ("MLflow")
    schemes: tuple[str, ...]  # URI schemes it answers to, as listed to users
    uris: tuple[tuple[str, str], ...] = ()  # (pattern, meaning) lines for --help and the README
    capabilities: Capabilities = field(default_factory=Capabilities)
    extra: str | None = None  # the pip extra that installs its SDK
    # (scheme, rest after "://", raw URI) -> the location the SDK understands
    parse: Callable[[str, str, str], str] = lambda scheme, rest, raw: local_path(rest)
    accepts: Callable[[str], bool] | None = None  # schemes beyond the listed ones
    open_source: Callable[..., Any] = _no  # (Target, **options) -> Source
    open_sink: Callable[..., Any] = _no  # (Target, **options) -> Sink
    not_a_destination: str = ""  # why, when writes is False or the scheme is read only
    read_only: tuple[str, ...] = ()  # schemes it reads but never writes (a backup's format)
    not_a_source: str = ""
    check_source: Callable[[Target], None] | None = None  # cheap checks before any read
    check_destination: Callable[[Target], None] | None = None  # ... before any export
    canonical: Callable[[Target], str] | None = None  # one spelling per place
    transient: Callable[[BaseException], bool] | None = None  # errors worth retrying
    bookkeeping_tags: tuple[str, ...] = ()  # tags its reader reports that hold no user data
    # native landing (trackbridge.native): its reader's key for a system metric -> the
    # neutral name (None: not a system metric), and the neutral name -> its writer's key
    system_metric: Callable[[str], str | None] | None = None
    system_metric_key: Callable[[str], str] | None = None
    # series its reader passes on that the tracker itself keeps in every run (W&B's
    # ``_runtime``): a destination keeps them out of the user's metrics
    bookkeeping_metrics: tuple[str, ...] = ()
    # the key an earlier trackbridge gave an object whose key form has changed since, so
    # destinations written before are still recognised
    legacy_key: Callable[[str], str] | None = None
    in_process: Callable[[Target], bool] | None = None  # per URI, overrides capabilities.local
    # the destination options (``--artifact-root``: "artifact_root") its writer takes
    # beyond the common ones; another tracker given one refuses it
    sink_options: tuple[str, ...] = ()
    # writes demo data with the tracker's own SDK into a folder (saying what it does
    # through the callback), returns the source URI: what ``quickstart --source`` offers
    demo: Callable[[Path, Callable[[str], None]], str] | None = None
    # a new, empty destination inside a local folder (its URI): what the conformance
    # tests write into; None for a tracker that needs a server or writes nowhere
    scratch: Callable[[Path], str] | None = None
    order: int = 100  # place in lists shown to users
    # the environment a standalone trackbridge process sets for the tracker's SDK: a value
    # is a default (MLflow's telemetry off), None removes what a parent process left
    # (a W&B parent's service, which a killed import would leave runs open in)
    process_env: tuple[tuple[str, str | None], ...] = ()

    def claims(self, scheme: str) -> bool:
        return scheme in self.schemes or (self.accepts is not None and self.accepts(scheme))

    def is_local(self, t: Target) -> bool:
        return self.in_process(t) if self.in_process is not None else self.capabilities.local


@functools.cache
def registry() -> tuple[Tracker, ...]:
    """Every declared tracker, in display order. Two declarations of one name, or a
    scheme claimed twice, is a packaging mistake worth one clear line."""
    found: dict[str, Tracker] = {}
    for ep in entry_points(group=GROUP):
        try:
            t = ep.load()
        except ImportError as e:
            raise UsageError(f"the tracker {ep.name!r} ({ep.value}) cannot be loaded: {e}") from e
        if not isinstance(t, Tracker):
            raise UsageError(f"the tracker entry point {ep.name!r} ({ep.value}) is not a Tracker")
        if t.name in found and found[t.name] is not t:
            raise UsageError(f"two packages declare the tracker {t.name!r}")
        found[t.name] = t
    schemes: dict[str, str] = {}
    for t in found.values():
        for s in t.schemes:
            if schemes.setdefault(s, t.name) != t.name:
                raise UsageError(f"the URI scheme {s!r} is declared by both {schemes[s]!r} and {t.name!r}")
    return tuple(sorted(found.values(), key=lambda t: (t.order, t.name)))


def reload() -> None:
    """Forget the declarations read so far (a test that installs a tracker at run time)."""
    registry.cache_clear()


def by_name(name: str) -> Tracker:
    for t in registry():
        if t.name == name:
            return t
    raise UsageError(f"no tracker named {name!r} is installed")


def for_scheme(scheme: str) -> Tracker | None:
    return next((t for t in registry() if t.claims(scheme)), None)


def all_schemes() -> list[str]:
    return [s for t in registry() for s in t.schemes]


def uri_help(width: int = 29) -> str:
    """The URI list ``--help`` shows, one entry per pattern, from the declarations."""
    import textwrap

    lines = []
    for t in registry():
        for pattern, meaning in t.uris:
            text = textwrap.wrap(meaning, 88 - width - 2, break_on_hyphens=False) or [""]
            first = f"  {pattern:<{width}}" if len(pattern) < width else f"  {pattern} "
            lines.append(first + text[0])
            lines += [" " * (width + 2) + rest for rest in text[1:]]
    return "\n".join(lines)


def support_table() -> str:
    """The README's support table, from the declarations (a test keeps the two equal)."""
    rows = ["| tracker | URIs | read | write | extra |", "|---|---|---|---|---|"]
    for t in registry():
        uris = ", ".join(f"`{s}://`" + (" (read only)" if s in t.read_only else "") for s in t.schemes)
        caps = t.capabilities
        extra = f"`[{t.extra}]`" if t.extra else "(built in)"
        read, write = ("yes" if ok else "no" for ok in (caps.reads, caps.writes))
        rows.append(f"| {t.title} | {uris} | {read} | {write} | {extra} |")
    return "\n".join(rows)


def transient(exc: BaseException) -> bool:
    """Whether any tracker calls this error worth another try (its database was busy, its
    server said so in words rather than a status code)."""
    return any(t.transient is not None and t.transient(exc) for t in registry())


def prepare_process() -> None:
    """Apply every tracker's ``process_env``: what the ``trackbridge`` command does first."""
    import os

    for t in registry():
        for name, value in t.process_env:
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ.setdefault(name, value)


def bookkeeping_tags() -> frozenset[str]:
    """Tags any tracker keeps for itself: verify compares the fields they mirror instead."""
    return frozenset(tag for t in registry() for tag in t.bookkeeping_tags)


def coarsest_ms(names: Iterable[str]) -> int:
    """The precision two trackers can both keep: what verify compares times at."""
    return max((by_name(n).capabilities.time_precision_ms for n in names), default=1)
