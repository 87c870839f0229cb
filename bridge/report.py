"""The import report: what moved, what was mapped to fit the destination, what failed.

Nothing may be lost silently, so every adapter that has to change data to fit a
destination limit records it here, per run. The CLI prints a summary and can write the
whole report as JSON for monitoring.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Mapping:
    kind: str  # e.g. "param-value-truncated", "key-renamed", "status-mapped"
    field: str  # the table and key it concerns
    detail: str  # how to get the original back

    def __str__(self) -> str:
        return f"{self.kind} {self.field}: {self.detail}"


@dataclass
class RunReport:
    run_key: str
    name: str | None = None
    outcome: str = "pending"  # new | updated | unchanged | filtered | failed
    destination_id: str | None = None
    points: int = 0
    files: int = 0
    bytes: int = 0
    mappings: list[Mapping] = field(default_factory=list)
    error: str | None = None
    reason: str | None = None  # why a run was filtered out

    def mapped(self, kind: str, where: str, detail: str) -> None:
        self.mappings.append(Mapping(kind, where, detail))


@dataclass
class Report:
    source: str = ""
    destination: str = ""
    runs: list[RunReport] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=lambda: {"new": 0, "unchanged": 0})
    other_mappings: list[Mapping] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # files of artifacts that no run owns (a Neptune model version's)
    files: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def run(self, run_key: str, name: str | None = None) -> RunReport:
        r = RunReport(run_key=run_key, name=name)
        with self._lock:
            self.runs.append(r)
        return r

    def mapped(self, kind: str, where: str, detail: str) -> None:
        with self._lock:
            self.other_mappings.append(Mapping(kind, where, detail))

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.runs if r.outcome == outcome)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(r.outcome == "failed" for r in self.runs)

    @property
    def points(self) -> int:
        return sum(r.points for r in self.runs)

    def all_mappings(self) -> list[tuple[str, Mapping]]:
        out = [(r.run_key, m) for r in self.runs for m in r.mappings]
        out += [("-", m) for m in self.other_mappings]
        return out

    def summary_lines(self) -> list[str]:
        filtered = f", {self.count('filtered')} filtered out" if self.count("filtered") else ""
        lines = [
            f"runs: {self.count('new')} new, {self.count('updated')} updated, "
            f"{self.count('unchanged')} unchanged, {self.count('failed')} failed{filtered}",
            f"metric points written: {self.points:,}; artifact files written: "
            f"{self.files + sum(r.files for r in self.runs):,} "
            f"({self.bytes + sum(r.bytes for r in self.runs):,} bytes)",
            f"model versions: {self.models.get('new', 0)} new, {self.models.get('unchanged', 0)} unchanged"
            + (
                f", {self.models['linked']} linked into the W&B Registry" if self.models.get("linked") else ""
            ),
        ]
        maps = self.all_mappings()
        if maps:
            lines.append(f"mapped to fit the destination ({len(maps)}):")
            lines += [f"  {key}: {m}" for key, m in maps[:50]]
            if len(maps) > 50:
                lines.append(f"  … and {len(maps) - 50} more (see --report)")
        for r in self.runs:
            if r.outcome == "failed":
                lines.append(f"FAILED {r.run_key} ({r.name}): {r.error}")
        lines += [f"ERROR {e}" for e in self.errors]
        return [scrub(line) for line in lines]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "summary": {
                "new": self.count("new"),
                "updated": self.count("updated"),
                "unchanged": self.count("unchanged"),
                "failed": self.count("failed"),
                "filtered": self.count("filtered"),
                "points": self.points,
                "models": self.models,
            },
            "runs": [asdict(r) for r in self.runs],
            "mappings": [asdict(m) for m in self.other_mappings],
            "errors": self.errors,
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(scrub(json.dumps(self.to_json(), indent=2, default=str)))


_USERINFO = re.compile(r"(?<=://)[^/\s@'\"]+@")
_SECRET = re.compile(
    r"(?i)((?:token|password|api[_-]?key|secret|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s,\"'&]+"
)

_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")


def scrub(text: str) -> str:
    """Credentials out of any text we print or write: user:password@ in URLs, and
    token=/password=/api_key= style values that a library put into an error message."""
    return _SECRET.sub(r"\1***", _BEARER.sub(r"\1 ***", _USERINFO.sub("***@", text)))
