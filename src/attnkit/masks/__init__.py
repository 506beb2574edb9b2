"""Placeholder until the mask zoo lands (being written now)."""
