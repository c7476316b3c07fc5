"""Tasks: plan the evaluation of experiment folders; sample and score one model's output diversity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dpo_core import data, experiment
from dpo_core.config import EvalConfig
from dpo_core.settings import Settings
from tasks.caching import content_key
from tasks.policy import CACHED, NETWORK_RETRIES, where
from tasks.setup import task_tags


def _registries(parameters: dict[str, Any]) -> list[str | None]:
    return [data.content_hash(Path(run_dir) / name) if (Path(run_dir) / name).exists() else None
            for run_dir in parameters["run_dirs"] for name in ("config.json", "checkpoints.jsonl")]


@task(name="plan-evaluation", tags=task_tags(), cache_key_fn=content_key(extra=_registries), **CACHED)
def plan_evaluation(run_dirs: list[str], instruction: str | None = None) -> list[experiment.EvalRequest]:
    return experiment.plan_evaluation(run_dirs, instruction)


def _eval_inputs(parameters: dict[str, Any]) -> list[Any]:
    request: experiment.EvalRequest = parameters["request"]
    training = [data.content_hash(Path(p)) if Path(p).exists() else None for p in request.training_datasets]
    return [*where(), experiment.eval_fingerprint(parameters["eval_config"], Settings()), training]


# No task timeout here: evaluations run in worker threads, where Prefect cannot interrupt them; the SDK's own
# per-request timeouts and retries bound a stuck sampling call instead.
@task(name="evaluate-diversity", tags=task_tags("tinker-sample"), **NETWORK_RETRIES,
      cache_key_fn=content_key(extra=_eval_inputs), **CACHED)
def evaluate_model(request: experiment.EvalRequest, eval_config: EvalConfig) -> str:
    return experiment.evaluate_model(request, eval_config, Settings())
