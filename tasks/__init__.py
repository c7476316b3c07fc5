"""Prefect tasks: one per dpo_core call; retries, cache policies, timeouts and tags only (see DESIGN)."""
