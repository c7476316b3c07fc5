"""tinker-cookbook's own, unmodified `preference.train_dpo.main` runs against the local server."""

from __future__ import annotations

import json

import chz
import datasets
from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonDatasetBuilder
from tinker_cookbook.preference.types import Comparison, LabeledComparison
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

from dpo_core.models import SMOLLM2_RENDERER

TINY = "local/tiny"


@chz.chz
class InlineComparisons(ComparisonDatasetBuilder):
    """Four hand-written comparisons, enough for two batches of two."""

    def get_train_and_test_datasets(self):
        rows = [
            {"prompt": f"Question {i}: name a fruit.", "chosen": f"A ripe mango, number {i}.", "rejected": "No."}
            for i in range(4)
        ]
        return datasets.Dataset.from_list(rows), None

    def example_to_labeled_comparison(self, example):
        comparison = Comparison(
            prompt_conversation=[{"role": "user", "content": example["prompt"]}],
            completion_A=[{"role": "assistant", "content": example["chosen"]}],
            completion_B=[{"role": "assistant", "content": example["rejected"]}],
        )
        return LabeledComparison(comparison=comparison, label="A")


def test_cookbook_train_dpo_main_runs_two_steps(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", server.api_key)
    log_path = tmp_path / "cookbook-run"
    config = train_dpo.Config(
        log_path=str(log_path),
        model_name=TINY,
        recipe_name="dpo-suite-contract-test",
        renderer_name=SMOLLM2_RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            comparison_builder=InlineComparisons(),
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=TINY, renderer_name=SMOLLM2_RENDERER, max_length=128, batch_size=2,
            ),
        ),
        learning_rate=1e-3,
        lora_rank=4,
        base_url=server.base_url,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
        max_steps=2,
    )
    train_dpo.main(config)

    metrics = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "dpo_loss" in m]
    assert len(steps) == 2
    assert all(0 < m["dpo_loss"] < 2 and "accuracy" in m and "margin" in m for m in steps)
    checkpoints = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]
    assert checkpoints[-1]["name"] == "final"
    assert checkpoints[-1]["sampler_path"].startswith("tinker://")
    assert checkpoints[-1]["state_path"].startswith("tinker://")
    _, _, _, folder = server.engine.checkpoint_dir(checkpoints[-1]["sampler_path"])
    assert (folder / "adapter_model.safetensors").exists()
