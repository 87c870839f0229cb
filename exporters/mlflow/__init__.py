"""MLflow's reader: ``MlflowSource`` (``source``), with its histories (``history``), files
(``files``) and models and registry (``models``) in modules of their own."""
