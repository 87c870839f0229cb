"""W&B's readers: offline run folders (``offline``), the online API (``online``) and the
shim's W&B-shaped spool (``spool``), built on one run builder (``builder``) and a fast
decoder of the ``.wandb`` record log (``decode``)."""
