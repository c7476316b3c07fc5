"""`dpo-suite` on `local/tiny` under the Prefect harness: runs, artifacts, caching on file contents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dpo_core.plan import SuiteConfig


def _task_states(flow_run_id, settle_s: float = 30.0) -> dict[str, list[str]]:
    """Task name -> final state names of every task run under a flow run (subflows included).

    Task states reach the server as events, a moment after the flow returns; read until none is still
    Pending/Running (or `settle_s` passes, leaving the test to show what it saw).
    """
    import time

    deadline = time.monotonic() + settle_s
    while True:
        states = _read_task_states(flow_run_id)
        unsettled = any(s in ("Pending", "Running", "Scheduled") for names in states.values() for s in names)
        if not unsettled or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def _read_task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        flow_runs = [flow_run_id] + [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))]
        states: dict[str, list[str]] = {}
        for run_id in flow_runs:
            from prefect.client.schemas.filters import FlowRunFilterId

            for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))):
                if task_run.name.startswith("dpo-train"):
                    continue  # the placeholder task run of a subflow, not a task
                # No state yet: its first state event has not reached the server (seen under load); unsettled.
                state = task_run.state.name if task_run.state else "Pending"
                states.setdefault(task_run.name.rsplit("-", 1)[0], []).append(state)
    return states


def _artifacts(flow_run_id) -> set[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key for a in found if a.key}


@pytest.fixture
def local_data(project_env, monkeypatch, shipped_data):
    """A private copy of the tests' data, so a test may edit a dataset."""
    folder = project_env / "data"
    shutil.copytree(shipped_data, folder)
    monkeypatch.setenv("DPO_DATA_DIR", str(folder))
    return folder


SMALL = dict(datasets=[1, 2], models=["local/tiny"], learning_rate=[1e-3], batch_size=32, max_length=128,
             allow_few_steps=True,  # 3 steps on purpose: the suite machinery, not learning, is under test
             eval_num_samples=2, eval_max_prompts=3, eval_max_tokens=8)


@pytest.mark.minutes(5)
def test_suite_runs_caches_and_reruns_only_what_changed(prefect_harness, project_env, local_data):
    from flows.suite import dpo_suite

    config = SuiteConfig(**SMALL, report_dir=str(project_env / "report"))
    first = dpo_suite(config, return_state=True)
    assert first.is_completed(), first.message
    runs = sorted((project_env / "experiments").glob("dataset*"))
    assert [r.name.split("_")[0] for r in runs] == ["dataset1", "dataset2"]
    for run in runs:
        assert (run / "checkpoints.jsonl").exists() and list((run / "eval").glob("final_*/scores.parquet"))
    report = (project_env / "report" / "report.md").read_text()
    assert report.index("## Findings") < report.index("## Overall") and "### Held-out DPO accuracy" in report
    assert all(len((run / "held_out.jsonl").read_text().splitlines()) == 2 for run in runs)  # initial, final
    assert {"validation-1", "validation-2", "dpo-checkpoints", "dpo-diversity-report"} <= _artifacts(
        first.state_details.flow_run_id)
    # The report's numbers are the per-prompt files' means.
    table = pd.read_csv(project_env / "report" / "table.csv")
    for _, row in table.iterrows():
        scores = pd.read_parquet(Path(_eval_dir(row, project_env)) / "scores.parquet")
        assert row["distinct_2/all"] == pytest.approx(scores["distinct_2"].mean())
        for bucket, part in scores.groupby("bucket"):
            assert row[f"embedding_distance/{bucket}"] == pytest.approx(part["embedding_distance"].mean())

    second = dpo_suite(config, return_state=True)
    assert second.is_completed()
    states = _task_states(second.state_details.flow_run_id)
    assert states and all(s == "Cached" for names in states.values() for s in names), states

    frame = pd.read_parquet(local_data / "dataset2_quality_based.parquet")
    frame.loc[0, "chosen"] = frame.loc[0, "chosen"] + " Truly."
    frame.to_parquet(local_data / "dataset2_quality_based.parquet")
    third = dpo_suite(config, return_state=True)
    assert third.is_completed()
    states = _task_states(third.state_details.flow_run_id)
    assert states["train-dpo"].count("Cached") == 1 and states["train-dpo"].count("Completed") == 1


def _eval_dir(row, project_env) -> str:
    import json

    if row["dataset"] in ("base", "prompt"):  # the base model, and the base model with the diversity prompt
        folders = (project_env / "experiments" / "base_models").glob("*/eval_*")
        return str(next(f for f in folders if ("_prompted-" in f.name) == (row["dataset"] == "prompt")))
    run = next((project_env / "experiments").glob(f"dataset{row['dataset']}_*"))
    folder = next((run / "eval").glob("final_*"))
    assert json.loads((folder / "summary.json").read_text())["label"] == run.name
    return str(folder)


@pytest.mark.minutes(2)
def test_missing_dataset_is_skipped_and_a_failed_experiment_is_reported(prefect_harness, project_env, local_data):
    from flows.suite import dpo_suite

    (local_data / "dataset3_llm_judge_diversity.parquet").unlink()
    # Valid rows whose prompts alone fill max_length: validation passes, training refuses (a failed experiment).
    too_long = local_data / "long_prompts.jsonl"
    too_long.write_text("".join(json.dumps({"prompt": f"Question {i}: " + "tell me more " * 80, "chosen": "Yes.",
                                            "rejected": "No."}) + "\n" for i in range(4)))
    config = SuiteConfig(datasets=[3, 1, str(too_long)], models=["local/tiny"], learning_rate=[1e-3],
                         batch_size=32, max_length=128, evaluate=False, allow_few_steps=True)
    state = dpo_suite(config, return_state=True)
    assert state.is_failed()
    assert "dataset-long_prompts" in state.message and "max_length=128" in state.message
    assert "dataset 3" not in state.message  # missing: skipped with a warning, not a failure
    assert [r.name.split("_")[1] for r in (project_env / "experiments").glob("dataset1_*")] == ["tiny"]

    # An explicit model the service does not serve is an error before any training (issue 13).
    unserved = config.model_copy(update={"datasets": [2], "models": ["local/tiny", "Qwen/Qwen3-8B"]})
    state = dpo_suite(unserved, return_state=True)
    assert state.is_failed() and "Qwen/Qwen3-8B" in state.message and "not served by the local server" in state.message
    assert not list((project_env / "experiments").glob("dataset2_*"))


@pytest.mark.minutes(1.5)
def test_suite_keeps_secrets_out_of_files_logs_parameters_and_artifacts(prefect_harness, project_env, monkeypatch):
    """Reliability item 8: canary keys in the environment never reach anything the suite writes."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId,
        LogFilter, LogFilterFlowRunId,
    )

    from flows.suite import dpo_suite

    tinker_canary, wandb_canary = "tml-canary-suite-5e1d2c3b4a69", "wandb-canary-suite-0f1e2d3c4b5a69788796"
    monkeypatch.setenv("TINKER_API_KEY", tinker_canary)  # present, but the backend is local
    monkeypatch.setenv("WANDB_API_KEY", wandb_canary)
    monkeypatch.setenv("DPO_WANDB_MODE", "offline")
    config = SuiteConfig(datasets=[2], models=["local/tiny"], learning_rate=[1e-3], batch_size=80, max_length=128,
                         allow_few_steps=True,
                         eval_num_samples=2, eval_max_prompts=2, eval_max_tokens=4, wandb_project="canary-check",
                         report_dir=str(project_env / "report"))
    state = dpo_suite(config, return_state=True)
    assert state.is_completed(), state.message
    assert list((project_env / "experiments").rglob("*.wandb")), "the W&B run was written (offline)"
    files = [f for f in project_env.rglob("*") if f.is_file()]
    assert len(files) > 10
    for file in files:
        content = file.read_bytes()
        assert tinker_canary.encode() not in content and wandb_canary.encode() not in content, f"leak in {file}"
    root = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(root)] + client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[root])))
        ids = [r.id for r in runs]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    assert len(runs) == 2 and logs and artifacts  # the suite and its dpo-train subflow
    written = json.dumps([[r.parameters for r in runs], [log.message for log in logs],
                          [a.data for a in artifacts], [t.task_inputs for t in task_runs]], default=str)
    assert tinker_canary not in written and wandb_canary not in written


@pytest.fixture
def second_tiny_model(project_env, registered, monkeypatch) -> str:
    """A second random-init model, larger than local/tiny (~4M parameters, named so), served from a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_core import models as catalog
    from dpo_core import rendering

    name, folder = "test/Tiny-4M", project_env / "tiny-4m"
    folder.mkdir()
    for path in catalog.tokenizer_dir(catalog.SMOLLM2, registered).iterdir():
        shutil.copy(path, folder / path.name)
    torch.manual_seed(7)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=80, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
                     ).save_pretrained(folder)
    monkeypatch.setenv("DPO_LOCAL_MODELS", json.dumps({name: str(folder)}))
    rendering.register_models(registered, {name: folder})
    return name


@pytest.mark.minutes(5)
def test_two_models_two_seeds_report_seed_level_findings_the_baseline_and_model_size(
        prefect_harness, project_env, second_tiny_model):
    """Two base models, two training seeds each, on datasets 1 and 2 (small settings): the report states its
    findings with 2 seeds, has the prompting baseline and the completion rates, and compares each dataset's
    effect between the two models, smaller first."""
    from flows.suite import dpo_suite

    from dpo_core.models import SMOLLM2_RENDERER

    # Both models read SmolLM2's tokenizer; a folder model has no cookbook renderer of its own, so name it.
    config = SuiteConfig(**{**SMALL, "models": ["local/tiny", second_tiny_model]}, seeds=2,
                         renderer_name=SMOLLM2_RENDERER, report_dir=str(project_env / "report"))
    state = dpo_suite(config, return_state=True)
    assert state.is_completed(), state.message
    runs = sorted((project_env / "experiments").glob("dataset*"))
    assert len(runs) == 8  # 2 datasets x 2 models x 2 seeds
    seeds = sorted(json.loads((r / "config.json").read_text())["train_config"]["seed"] for r in runs)
    assert seeds == [0] * 4 + [1] * 4
    report = (project_env / "report" / "report.md").read_text()
    headline = report[report.index("## Findings"):report.index("### Details")]
    assert "2 seeds, 3 prompts" in headline and "on Tiny-4M" in headline and "on tiny" in headline
    assert "The prompting baseline" in headline and "Samples that ended on their own before max_tokens 8" in headline
    assert "### Model size" in report and "between tiny and Tiny-4M" in report
    paired = pd.read_csv(project_env / "report" / "paired.csv")
    trained = paired[paired["dataset"].astype(str).isin(["1", "2"])]
    assert set(trained["num_seeds"]) == {2} and set(paired.loc[paired["dataset"] == "prompt", "num_seeds"]) == {1}
    assert {"utility_k", "distinct_k", "effective_vendi", "valid_rate"} <= set(paired["metric"])
    sizes = pd.read_csv(project_env / "report" / "model_size.csv")
    assert set(sizes["dataset"].astype(str)) == {"1", "2", "prompt"}  # the prompting baseline by model too
    assert set(sizes.loc[sizes["dataset"].astype(str) != "prompt", "num_seeds"]) == {2}
    assert set(sizes["smaller"]) == {"local/tiny"} and set(sizes["larger"]) == {second_tiny_model}
    assert (project_env / "report" / "model_size.png").exists()
