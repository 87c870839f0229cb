"""Exporters: one module per source tracker; each reads it into the neutral schema."""
