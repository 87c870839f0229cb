"""The trackers trackbridge ships: one package per tracker, holding its declaration
(``TRACKER``) and what its reader (``trackbridge.exporters``) and writer
(``trackbridge.importers``) share. Other packages add trackers through the
``trackbridge.trackers`` entry point group."""
