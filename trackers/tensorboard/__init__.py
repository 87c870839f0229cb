"""TensorBoard event files, declared once, as a source only: the most common tracking
data that is in no tracker at all (PyTorch's ``SummaryWriter``, Lightning's default
logger and Keras write them). ``tensorboard:///PATH`` is a folder holding
``events.out.tfevents.*`` files at any depth; each folder that holds some is a run, as
TensorBoard itself groups them."""

from __future__ import annotations

from typing import Any

from trackbridge.tracker import Capabilities, Target, Tracker

SCHEME = "tensorboard"
EVENTS_PREFIX = "events.out.tfevents."


def project_key(name: str) -> str:
    return f"tensorboard:project/{name}"


def run_key(project: str, rel: str) -> str:
    return f"tensorboard:run/{project}/{rel}"


def _open_source(t: Target, **options: Any) -> Any:
    from trackbridge.exporters.tensorboard.reader import TensorBoardSource

    return TensorBoardSource(t.inner, **options)


TRACKER = Tracker(
    name="tensorboard",
    title="TensorBoard",
    schemes=(SCHEME,),
    uris=(
        (
            "tensorboard:///ABS/PATH",
            "a folder of TensorBoard event files at any depth; each folder holding some is a run, "
            "its path the run's name, the top folder the project (read only)",
        ),
    ),
    # wall times are doubles in seconds: kept to the microsecond
    capabilities=Capabilities(local=True, writes=False),
    extra="tensorboard",
    open_source=_open_source,
    not_a_destination=(
        "TensorBoard event files are a source only: migrate them into mlflow+… or wandb+offline://…"
    ),
    order=40,
)
