"""Tasks: what the service serves, and the suite's plan for the backend this worker talks to."""

from __future__ import annotations

from datetime import timedelta

from prefect import task

from dpo_core import experiment
from dpo_core.plan import SuiteConfig, SuitePlan, plan_suite
from dpo_core.settings import Settings
from tasks.caching import content_key
from tasks.policy import CACHED, NETWORK_RETRIES, where
from tasks.setup import task_tags


def _service(parameters: dict) -> list[str]:
    settings = Settings()
    return [*where(parameters), str(sorted((k, str(v)) for k, v in settings.local_models.items()))]


# Cached for an hour only: the lineup is the service's to change (it retires models), but not within one sitting,
# and a rerun of an unchanged suite stays all cache hits.
@task(name="list-served-models", tags=task_tags(), **NETWORK_RETRIES, cache_key_fn=content_key(extra=_service),
      cache_expiration=timedelta(hours=1), **CACHED)
def list_served_models() -> dict[str, bool]:
    return experiment.served_models(Settings())


@task(name="plan-suite", tags=task_tags(), cache_key_fn=content_key(extra=where), **CACHED)
def plan_experiments(config: SuiteConfig, served: dict[str, bool] | None = None) -> SuitePlan:
    return plan_suite(config, Settings().resolved_backend(), served)
