"""W&B offline run folders written with the SDK, for ``wandb sync``: a run is found by
the id derived from its source key, rewritten whole when it changed, under a lock per
run id, and marked complete by ``trackbridge.json`` written last.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from trackbridge.files import atomic_write_bytes
from trackbridge.importers.wandb.history import history_of, with_links
from trackbridge.importers.wandb.sink import MARKER, SdkSink
from trackbridge.locks import file_lock
from trackbridge.model import RegistryPayload, RunPayload
from trackbridge.report import RunReport
from trackbridge.write import Found


class WandbOfflineSink(SdkSink):
    def __init__(self, path: str, dry_run: bool = False) -> None:
        super().__init__(dry_run)
        self.root = Path(path).expanduser().resolve()
        self._index: dict[str, dict[str, Any]] | None = None

    def describe(self) -> str:
        return f"wandb+offline://{self.root}"

    def begin(self, source: str) -> None:
        self.origin = source
        if not self.dry_run:
            self.root.mkdir(parents=True, exist_ok=True)

    def _runs_index(self) -> dict[str, dict[str, Any]]:
        """run id → {"fingerprint": marker's or None, "dirs": [folders]} for our folder."""
        if self._index is None:
            from trackbridge.trackers.wandb.runfolder import RUN_DIR

            index: dict[str, dict[str, Any]] = {}
            base = self.root / "wandb"
            for d in sorted(base.iterdir()) if base.is_dir() else []:
                if d.is_dir() and RUN_DIR.match(d.name):
                    self._add_folder(index, d)
            self._index = index
        return self._index

    @staticmethod
    def _add_folder(index: dict[str, dict[str, Any]], d: Path) -> None:
        from trackbridge.trackers.wandb.runfolder import RUN_DIR, read_head

        logs = list(d.glob("run-*.wandb"))
        run_id = read_head(logs[0]).run_id if logs else RUN_DIR.match(d.name).group(2)  # type: ignore[union-attr]
        entry = index.setdefault(run_id, {"fingerprint": None, "dirs": []})
        entry["dirs"].append(d)
        marker = d / MARKER
        if marker.exists():
            entry["fingerprint"] = json.loads(marker.read_text()).get("fingerprint")

    def _fresh(self, run_id: str) -> dict[str, Any] | None:
        """The run's folders as they are now: another process may have written it since
        the index was read (folders are named ``…-<run id>``, a second one of the same
        second ``…-<run id>-1``; the run id inside the log decides)."""
        from trackbridge.trackers.wandb.runfolder import RUN_DIR

        index: dict[str, dict[str, Any]] = {}
        for d in sorted((self.root / "wandb").glob(f"*-{run_id}*")):
            if d.is_dir() and RUN_DIR.match(d.name):
                self._add_folder(index, d)
        return index.get(run_id)

    def _run_lock(self, run_id: str) -> Any:
        """One writer per run across processes: a lock file per run id beside the runs."""
        folder = self.root / ".trackbridge-locks"
        folder.mkdir(exist_ok=True)
        return file_lock(folder / f"{run_id}.lock")

    # -- the write template's primitives (trackbridge.write)

    def find(self, payload: RunPayload, report: RunReport) -> Found | None:
        run_id = self._run_id(payload, report)
        have = self._runs_index().get(run_id)
        return Found(run_id, have["fingerprint"], state=have) if have else None

    def exclusive(self, payload: RunPayload) -> Any:
        stack = contextlib.ExitStack()
        stack.enter_context(self._lock)
        stack.enter_context(self._run_lock(self._run_id(payload)))
        return stack

    def settle(self, payload: RunPayload, found: Found | None, report: RunReport) -> Found:
        """The run's folders as they are now, under the run's lock (another process may
        have written it since the index was read)."""
        run_id = self._run_id(payload, report)
        have = self._fresh(run_id)
        if have is None:
            return Found(run_id, None, existed=False)
        self._runs_index()[run_id] = have
        return Found(run_id, have["fingerprint"], state=have, existed=True)

    def fit(self, payload: RunPayload, found: Found | None, report: RunReport) -> Any:
        project = self._project(payload, report)
        args, _ = self._init_args(project, self._run_id(payload, report), payload, report)
        return args

    def write(self, payload: RunPayload, run: Found, args: Any, report: RunReport) -> None:
        import wandb

        history = history_of(payload)
        for d in run.state["dirs"] if run.existed else []:
            shutil.rmtree(d)  # the whole run is written again; never two copies
        args = with_links(args, history)
        settings = wandb.Settings(mode="offline", **args.pop("settings"))
        wrun = wandb.init(dir=str(self.root), settings=settings, **args)
        self._log(wrun, payload, history, report)
        run.state = {"fingerprint": None, "dirs": [self._finish(wrun, payload)]}

    def seal(self, payload: RunPayload, run: Found, fingerprint: str, report: RunReport) -> None:
        folder = run.state["dirs"][0]
        atomic_write_bytes(
            folder / MARKER,
            json.dumps({"source_key": payload.key, "fingerprint": fingerprint, "run_id": run.id}).encode(),
        )
        self._runs_index()[run.id] = {"fingerprint": fingerprint, "dirs": [folder]}

    def write_registry(self, payload: RegistryPayload, report: Any) -> None:
        n = payload.model_versions.num_rows
        if n:
            report.mapped(
                "registry-not-written",
                "model_versions",
                f"{n} model version(s): offline W&B runs cannot hold registry links; "
                "link them after `wandb sync`, or migrate to wandb://",
            )
