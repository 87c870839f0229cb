"""W&B's writers: offline run folders (``offline``) and the online server (``online``),
both on one SDK sink (``sink``) and one history of rows (``history``)."""
