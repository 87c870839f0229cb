"""MLflow's writer: ``MlflowSink`` (``sink``: the write template's primitives), with
identity (``identity``), points (``points``), files (``files``), models and registry
(``models``) and the fitting of keys and values (``plan``) in modules of their own."""
