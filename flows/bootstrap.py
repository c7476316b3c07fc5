"""The process set-up every flow entry point shares, done on import, before Prefect itself is imported:
offline hygiene for the HF libraries, and Prefect's analytics off and a patient temporary-server start-up."""

from __future__ import annotations

import os

from dpo_core.settings import apply_offline_env

apply_offline_env()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
