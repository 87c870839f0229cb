"""Which of several copies of one source object a destination keeps.

Two processes that import the same source run into one MLflow server at the same moment
(two syncs of one pair, a migrate beside a sync, two machines) can both find no run
with its source key and both create one. A lock on one machine cannot stop two
machines, so the destination itself decides: every object trackbridge creates carries a
*claim* (the creating process's clock in nanoseconds, then random bits), and of several
objects with one source key the one with the smallest claim is kept. An object made by
an earlier trackbridge, with no claim, sorts first: it was there before.

The rule is the same for the creator that checks right after creating (it gives way if
an earlier claim exists) and for any later run that finds duplicates in its index (it
retires all but the keeper), so both arrive at the same keeper. A copy whose import has
finished goes before one that has not: it holds everything already, while the other may
be what a killed importer left.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def new_claim() -> str:
    """Sortable as text: zero-padded nanoseconds, then 8 random hex digits for ties."""
    return f"{time.time_ns():020d}-{secrets.token_hex(4)}"


def keeper(
    objects: Iterable[T],
    claim: Callable[[T], str | None],
    ident: Callable[[T], str],
    complete: Callable[[T], bool] = lambda o: False,
) -> T:
    """The object to keep: a complete one before one still being written (its import
    finished, or died), then the smallest claim (none sorts first), then the smallest id."""
    return min(objects, key=lambda o: (not complete(o), claim(o) or "", ident(o)))


def group_by_key(objects: Iterable[T], key: Callable[[T], str]) -> tuple[dict[str, T], dict[str, list[T]]]:
    """Objects by source key: the single ones, and the keys held by more than one."""
    groups: dict[str, list[T]] = {}
    for o in objects:
        groups.setdefault(key(o), []).append(o)
    single = {k: v[0] for k, v in groups.items() if len(v) == 1}
    return single, {k: v for k, v in groups.items() if len(v) > 1}
