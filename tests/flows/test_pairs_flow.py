"""`dpo-pairs` end to end on a few prompts: three datasets the validator accepts; reruns sample nothing new."""

from __future__ import annotations

import json

import pandas as pd

from dpo_core import data, dataset_checks
from dpo_core.models import SMOLLM2
from dpo_core.pairs import PairsConfig


def test_pairs_flow_builds_three_valid_datasets(prefect_harness, project_env):
    prompts = project_env / "prompts.jsonl"
    rows = [{"prompt_id": f"q{i}", "prompt": p, "creativity_score": c} for i, (p, c) in enumerate([
        ("Write a two-line poem about rain.", 0.9), ("Name a city in France.", 0.1),
        ("Describe a dragon in one sentence.", 0.8)])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from flows.pairs import dpo_pairs

    # Candidates from the tiny model, judged by the real SmolLM2 (tiny cannot answer a rubric).
    config = PairsConfig(prompts=str(prompts), model_name="local/tiny", judge_model=SMOLLM2, num_candidates=4,
                         max_tokens=12, out_dir=str(project_env / "out"), min_distance=0.0,
                         # the random tiny model rarely stops within 12 tokens: keep its cut candidates, flagged
                         exclude_truncated=False)
    state = dpo_pairs(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    for number in (1, 2, 3):
        path = project_env / "out" / data.DATASET_FILES[number]
        pairs, report = dataset_checks.validate(path)
        table = pd.read_parquet(path)
        assert len(pairs) == summary["per_dataset"][number]["pairs"] >= 1
        assert {"prompt_id", "creativity_score", "criterion", "chosen_quality", "rejected_quality", "model",
                "seed"} <= set(table.columns)
    quality = pd.read_parquet(project_env / "out" / data.DATASET_FILES[2])
    assert (quality["chosen_quality"] > quality["rejected_quality"]).all()
    diverse = pd.read_parquet(project_env / "out" / data.DATASET_FILES[1])
    # DivPO at rho 0.5 over 4 candidates: chosen comes from the top half by quality, rejected from the bottom half
    # (disjoint), so chosen's quality is never below rejected's. Their diversities are not ordered by the rule
    # (the most diverse of the top half may be less diverse than the least diverse of the bottom half); the
    # selection itself has known-answer unit tests (test_pairs.py).
    assert config.rho == 0.5 and config.num_candidates == 4
    assert (diverse["chosen_quality"] >= diverse["rejected_quality"]).all()
    assert diverse[["chosen_diversity", "rejected_diversity"]].notna().all().all()
    assert (project_env / "out" / "pairs_gaps.png").exists()
    # The judge's rating is read off its next-token distribution: every candidate gets one, on a graded scale.
    assert summary["judge_failures"]["originality"] == 0
    judged = pd.read_parquet(project_env / "out" / data.DATASET_FILES[3])
    scores = pd.concat([judged["chosen_originality"], judged["rejected_originality"]])
    assert scores.between(1, 10).all() and (scores != scores.round()).any()

    # One more prompt: only its candidates are sampled; the three old ones come from the stage cache.
    rows.append({"prompt_id": "q3", "prompt": "Invent a name for a robot.", "creativity_score": 0.7})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = dpo_pairs(config, return_state=True).result()
    assert again["cache"]["hits"] >= 3 * 3  # candidates, quality and judge stages of the first three prompts

    # Text scoring: the judge's sampled reply is parsed; failures are counted, not fatal.
    text = dpo_pairs(config.model_copy(update={"judge_scoring": "text", "judge_retries": 1}), return_state=True)
    assert text.is_completed(), text.message
    assert 0 <= text.result()["judge_failures"]["originality"] <= 4 * 4
