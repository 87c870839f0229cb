"""Importers: one module per destination tracker; each writes neutral data idempotently."""
