"""Task: the suite's plan for the backend this worker talks to."""

from __future__ import annotations

from prefect import task

from dpo_core.plan import SuiteConfig, SuitePlan, plan_suite
from dpo_core.settings import Settings
from tasks.caching import content_key
from tasks.policy import CACHED, where
from tasks.setup import task_tags


@task(name="plan-suite", tags=task_tags(), cache_key_fn=content_key(extra=where), **CACHED)
def plan_experiments(config: SuiteConfig) -> SuitePlan:
    return plan_suite(config, Settings().resolved_backend())
