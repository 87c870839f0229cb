"""Fitting keys and values into a destination's declared limits, visibly and reversibly.

A limit must never drop data quietly: what does not fit is changed in a documented way
(a key's characters replaced and a hash added when it is too long, a value cut with a
visible marker), the change is reported on the run, and the writer keeps the original
where its exporter takes it back (MLflow's ``trackbridge/mapping.json``). The limits are
the tracker's declaration (``Tracker.capabilities.limits``); the places the originals
are kept are the writer's.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from trackbridge.tracker import Limits

TRUNCATED = "…[truncated by trackbridge]"


def fit_key(key: str, limits: Limits) -> str:
    """The closest key the destination accepts: its charset, no empty or ``..`` path
    parts, at most ``key_chars`` characters (a hash of the original keeps two long keys
    apart)."""
    k = key
    if limits.key_pattern is not None:
        allowed = re.compile(limits.key_pattern)
        k = "".join(c if allowed.fullmatch(c) else "_" for c in key)
        parts = [("__" if p == ".." else p) for p in k.split("/") if p not in ("", ".")]
        k = "/".join(parts) or "_"
    if limits.key_chars is not None and len(k) > limits.key_chars:
        k = k[: limits.key_chars - 9] + "-" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return k


def insensitive(key: str) -> str:
    """What a case- and accent-insensitive collation (MySQL's default) compares of a key:
    ``LR`` and ``lr``, ``é`` and ``e``, ``a`` and ``a `` are one key to it."""
    decomposed = unicodedata.normalize("NFKD", key)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().rstrip(" ")


class KeySpace:
    """Fits keys of one kind (a run's params, tags or metrics) and keeps two different
    originals from landing on one key: one key as the destination compares keys
    (``same``: a case-insensitive database's ``insensitive``), not only as Python does."""

    def __init__(self, limits: Limits, same: Callable[[str], str] | None = None) -> None:
        self.limits = limits
        self.same = same or (lambda k: k)
        self.used: dict[str, object] = {}

    def fit(self, original: str, identity: object = None) -> str:
        """``identity`` tells keys apart that print the same (["a", "b"] vs ["a.b"])."""
        ident = original if identity is None else identity
        k = fit_key(original, self.limits)
        if self.used.get(self.same(k), ident) != ident:
            room = self.limits.key_chars or len(k) + 9
            k = k[: room - 9] + "-" + hashlib.sha1(repr(ident).encode()).hexdigest()[:8]
        self.used[self.same(k)] = ident
        return k


def fit_value(text: str, limit: int | None, where: str, report: Any, kept_in: str) -> tuple[str, bool]:
    """``text`` cut to ``limit`` with a visible marker, and whether it was cut; the caller
    keeps the full value in ``kept_in``, which the report names."""
    if limit is None or len(text) <= limit:
        return text, False
    report.mapped("value-truncated", where, f"full value in {kept_in}")
    return text[: limit - len(TRUNCATED)] + TRUNCATED, True
