"""Readers: one package per tracker (``mlflow``, ``wandb``, ``neptune``), each reading its
tracker into the neutral schema; what a reader shares with its writer is in
``trackbridge.trackers.<name>``."""
