"""The shim inside the two training loops most people use, imported only when asked for.

    from trackbridge.integrations import hf_callback, lightning_logger
    trainer = transformers.Trainer(..., callbacks=[hf_callback(project="p")])
    trainer = lightning.Trainer(..., logger=lightning_logger(project="p"))

Neither ``transformers`` nor ``lightning`` is a dependency of trackbridge: each class is
built on first call, on the library the caller already has. Both log through one
``trackbridge.shim.Run`` (``init``'s arguments pass through), so a Trainer's points get the
spool, the bounded queues and the catch-up at the end like any other run's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trackbridge import shim


def _numbers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}


def hf_callback(**init: Any) -> Any:
    """A ``transformers.TrainerCallback`` that logs the Trainer's logs at its global step.

    The run starts at ``on_train_begin`` with the TrainingArguments as config (under
    ``args``) and ends at ``on_train_end``; ``project`` defaults to the output folder's
    name, ``name`` to ``run_name``."""
    from transformers import TrainerCallback

    class TrackbridgeCallback(TrainerCallback):
        def __init__(self) -> None:
            self.run: shim.Run | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if self.run is not None or not state.is_world_process_zero:
                return
            options = dict(init)
            options.setdefault(
                "project", str(args.output_dir).rstrip("/").rsplit("/", 1)[-1] or "huggingface"
            )
            options.setdefault("name", args.run_name)
            config = {"args": _numbers(args.to_dict())}
            if model is not None and getattr(model, "config", None) is not None:
                config["model"] = _numbers(model.config.to_dict())
            options["config"] = {**config, **(options.get("config") or {})}
            self.run = shim.init(**options)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if self.run is None or not logs:
                return
            numbers = {
                k: v for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if numbers:
                self.run.log(numbers, step=state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.run is not None:
                self.run.summary["global_step"] = state.global_step
                self.run.finish()
                self.run = None

    return TrackbridgeCallback()


def lightning_logger(**init: Any) -> Any:
    """A Lightning ``Logger`` (``lightning.pytorch`` or ``pytorch_lightning``) over the shim."""
    try:
        from lightning.pytorch.loggers import Logger
        from lightning.pytorch.utilities import rank_zero_only
    except ImportError:
        from pytorch_lightning.loggers import Logger  # type: ignore[no-redef]
        from pytorch_lightning.utilities import rank_zero_only  # type: ignore[no-redef]

    class TrackbridgeLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self._run: shim.Run | None = None

        @property
        def experiment(self) -> shim.Run:
            if self._run is None:
                self._run = shim.init(**init)
            return self._run

        @property
        def name(self) -> str:
            return self.experiment.project

        @property
        def version(self) -> str:
            return self.experiment.id

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            # a dict (Lightning's AttributeDict is one, with an empty __dict__) or a Namespace
            self.experiment.config.update(dict(params) if isinstance(params, Mapping) else dict(vars(params)))

        @rank_zero_only
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.experiment.log({k: float(v) for k, v in metrics.items()}, step=step)

        @rank_zero_only
        def finalize(self, status: str) -> None:
            if self._run is not None:
                self._run.finish(exit_code=0 if status in ("success", "finished") else 1)

    return TrackbridgeLogger()
