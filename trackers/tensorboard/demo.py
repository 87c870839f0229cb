"""TensorBoard logs written by a real writer (PyTorch's ``SummaryWriter``), for the
quickstart, the tests and the benchmark: every kind of data the reader carries, in the
layouts users have (runs in sub-folders, a restart, hparams)."""

from __future__ import annotations

from pathlib import Path


def make_tensorboard_demo(root: Path) -> Path:
    """Three runs under ``root``: ``train/a`` (scalars, a text, an image, a histogram, a
    restart into a second file), ``train/b`` (hparams with their metric) and the root
    itself (one scalar). Written once; an existing demo is kept."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    if (root / "done").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    a = root / "train" / "a"
    with SummaryWriter(str(a)) as w:
        for step in range(50):
            w.add_scalar("loss", 1.0 / (step + 1), step)
            w.add_scalar("lr", 0.1 * 0.99**step, step)
        w.add_text("notes", "first *epoch* done", 10)
        img = np.zeros((3, 8, 16), dtype=np.uint8)
        img[0, :, :8] = 255
        w.add_image("samples/red", img, 20)
        w.add_histogram("weights", np.linspace(-1, 1, 101), 30)
    with SummaryWriter(str(a)) as w:  # the job restarted: a second file in the same folder
        for step in range(50, 60):
            w.add_scalar("loss", 1.0 / (step + 1), step)
    b = root / "train" / "b"
    with SummaryWriter(str(b)) as w:
        for step in range(5):
            w.add_scalar("accuracy", 0.5 + step * 0.1, step)
        w.add_hparams(
            {"lr": 0.01, "batch_size": 32, "optimizer": "adam", "dropout": True},
            {"hparam/accuracy": 0.9},
            run_name=".",
        )
    with SummaryWriter(str(root)) as w:
        w.add_scalar("setup/seconds", 3.5, 0)
    (root / "done").touch()
    return root
