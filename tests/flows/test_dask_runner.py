"""DPO_TASK_RUNNER=dask: the evaluation stage's tasks run on a `distributed.LocalCluster` of worker processes
and give the thread runner's results, number for number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("prefect_dask", reason="the dask extra: pip install 'dpo-suite[dask]'")

from dpo_core.config import EvalConfig, TrainConfig  # noqa: E402

TINY = "local/tiny"


def _evaluate(run_dir: str, report_dir: Path, runner_kind: str, monkeypatch) -> dict[str, dict]:
    """dpo-evaluate over `run_dir` with the runner DPO_TASK_RUNNER names; each model's summary by model label."""
    from flows.evaluate import dpo_evaluate
    from tasks.runners import task_runner_from_env

    monkeypatch.setenv("DPO_TASK_RUNNER", runner_kind)
    runner = task_runner_from_env()
    eval_config = EvalConfig(num_samples=2, max_prompts=3, max_tokens=8)
    state = dpo_evaluate.with_options(task_runner=runner)([run_dir], eval_config, str(report_dir),
                                                          return_state=True)
    assert state.is_completed(), state.message
    table = pd.read_csv(report_dir / "table.csv")
    return {"runner": type(runner).__name__, "table": table}


@pytest.mark.minutes(6)
def test_dask_evaluations_equal_the_thread_runner(prefect_harness, project_env, monkeypatch):
    from flows.train import dpo_train

    outcome = dpo_train(TrainConfig(model_name=TINY, dataset=2, learning_rate=1e-3, batch_size=32, max_length=128,
                                    allow_few_steps=True))  # runner equality, not learning: 3 steps do
    # The same experiment in a second experiments folder: its evaluations are new work (not cache hits) and
    # land in their own folders, while both read the same checkpoint from the shared server storage.
    threads_dir = Path(outcome.run_dir)
    dask_root = project_env / "experiments-dask"
    dask_dir = dask_root / threads_dir.name
    shutil.copytree(threads_dir, dask_dir)

    threads = _evaluate(str(threads_dir), project_env / "report-threads", "threads", monkeypatch)
    # Set before the flow starts: the LocalCluster's worker processes inherit this environment.
    monkeypatch.setenv("DPO_EXPERIMENTS_DIR", str(dask_root))
    dask = _evaluate(str(dask_dir), project_env / "report-dask", "dask", monkeypatch)

    assert (threads["runner"], dask["runner"]) == ("ThreadPoolTaskRunner", "DaskTaskRunner")
    # The evaluations really ran on the cluster's side: new eval folders under the copied experiment.
    assert list(dask_dir.glob("eval/*/summary.json"))
    # the base model, the base model with the diversity prompt (the prompting baseline) and the experiment
    assert len(threads["table"]) == len(dask["table"]) == 3
    numeric = threads["table"].select_dtypes("number").columns
    pd.testing.assert_frame_equal(threads["table"][numeric], dask["table"][numeric])
    # And each model's samples and scores: the trained checkpoint's eval folder under each experiment copy.
    for name in ("samples.jsonl", "scores.parquet"):
        found = [sorted(d.glob(f"eval/*/{name}")) for d in (threads_dir, dask_dir)]
        assert len(found[0]) == len(found[1]) == 1
        if name == "samples.jsonl":
            rows = [[json.loads(line) for line in f[0].read_text().splitlines()] for f in found]
            _assert_equal_to_float32(rows[0], rows[1])
        else:
            pd.testing.assert_frame_equal(pd.read_parquet(found[0][0]), pd.read_parquet(found[1][0]))
    overall = [json.loads(next(d.glob("eval/*/summary.json")).read_text())["overall"] for d in (threads_dir, dask_dir)]
    _assert_equal_to_float32(overall[0], overall[1])


def _assert_equal_to_float32(a, b) -> None:
    """Equal texts, tokens and counts; floats equal to float32 precision: the base model's fluency is a mean of the
    server's float32 logprobs, which the two runners may reach from the sampled tokens or from a scoring pass."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_equal_to_float32(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal_to_float32(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, nan_ok=True)
    else:
        assert a == b


def _validation_reports(flow_run_id) -> dict[str, str]:
    """The suite run's validation artifacts: key -> markdown."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in artifacts if a.key and a.key.startswith("validation-")}


def test_suite_validation_runs_on_an_existing_dask_scheduler(prefect_harness, project_env, monkeypatch):
    """DPO_TASK_RUNNER_ADDRESS: the suite's validations go to the workers of a scheduler started beforehand and
    give the reports validation gives in this process; a bad dataset's error (file, row, column) comes back from a
    worker intact."""
    from distributed import Client, LocalCluster, get_task_stream

    from dpo_core import experiment
    from dpo_core.plan import SuiteConfig
    from dpo_core.settings import Settings
    from flows.suite import dpo_suite
    from tasks.runners import task_runner_from_env

    bad = project_env / "missing_rejected.jsonl"
    bad.write_text(json.dumps({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hello."}) + "\n"
                   + json.dumps({"prompt": "Say bye.", "chosen": "Bye!"}) + "\n")
    # One step of 72 trained pairs: the step-count gate stops the suite after validation, before any training.
    config = SuiteConfig(datasets=[1, 2, 3, str(bad)], models=["local/tiny"], batch_size=72, evaluate=False)
    # The workers start with this environment (project_env's data, experiments and cache folders).
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.setenv("DPO_TASK_RUNNER", "dask")
        monkeypatch.setenv("DPO_TASK_RUNNER_ADDRESS", cluster.scheduler_address)
        runner = task_runner_from_env()
        assert type(runner).__name__ == "DaskTaskRunner" and runner.address == cluster.scheduler_address
        with Client(cluster.scheduler_address) as client, get_task_stream(client=client) as stream:
            state = dpo_suite.with_options(task_runner=runner)(config, return_state=True)
    assert len({entry["key"] for entry in stream.data}) >= 4, "the four validations ran on the cluster's workers"

    assert state.is_failed()
    assert "(fewer than 10)" in state.message, state.message
    # The bad dataset's error names the file, the row and the column, through the worker's pickling too.
    assert f"{bad}, row 1, column 'rejected'" in state.message, state.message
    reports = _validation_reports(state.state_details.flow_run_id)
    here = {dataset: experiment.validate_dataset(dataset, Settings()).report_markdown for dataset in (1, 2, 3)}
    assert sorted(reports.values()) == sorted(here.values())  # datasets 1, 2 and 3; the bad one has no report
