"""Writers: one package per tracker (``mlflow``, ``wandb``), each filling in the write
template's primitives (``trackbridge.write``) for its destination; what a writer shares
with its reader is in ``trackbridge.trackers.<name>``."""
