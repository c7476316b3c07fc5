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
    assert len(threads["table"]) == len(dask["table"]) == 2  # the base model and the experiment
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
