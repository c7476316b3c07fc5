"""Prefect flows: compose tasks top to bottom; no logic (see DESIGN)."""
