"""Neptune's readers: offline folders of either client (``offline``) and the Parquet of
Neptune's own exporter (``exporter``)."""
