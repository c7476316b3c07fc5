"""Findings on hand-made per-prompt scores and samples with planted effects of known size and place."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from dpo_core import diversity, stats
from dpo_core.findings import (Comparison, findings_markdown, paired_table, plan_comparisons,
                               plot_paired_differences, positive_control_sentence)
from dpo_core.length_control import common_word_lengths, mean_lengths

NUM_PROMPTS = 48  # 16 per creativity bucket


@dataclass(frozen=True)
class Entry:
    label: str
    model_name: str
    dataset: str | None = None
    learning_rate: float | None = None
    dpo_beta: float | None = None
    loss_type: str | None = None
    seed: int | None = None


def base_scores(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    creativity = (np.arange(NUM_PROMPTS) + 0.5) / NUM_PROMPTS
    return pd.DataFrame({
        "prompt_id": [f"p{i:02d}" for i in range(NUM_PROMPTS)], "creativity_score": creativity,
        "embedding_distance": rng.uniform(0.2, 0.7, NUM_PROMPTS), "vendi": rng.uniform(1.5, 3.5, NUM_PROMPTS),
        "distinct_1": rng.uniform(0.3, 0.8, NUM_PROMPTS), "distinct_2": rng.uniform(0.5, 0.95, NUM_PROMPTS),
        "self_bleu": rng.uniform(0.05, 0.4, NUM_PROMPTS), "compression_ratio": rng.uniform(1.5, 3.0, NUM_PROMPTS),
        "quality_logprob": rng.uniform(-3.0, -2.0, NUM_PROMPTS), "mean_words": rng.uniform(20, 60, NUM_PROMPTS),
    })


@pytest.fixture(scope="module")
def planted() -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """d1 raises embedding distance on high-creativity prompts only, d3 lowers self-BLEU on low ones, d2 = base."""
    rng = np.random.default_rng(1)
    base = base_scores()
    high, low = base["creativity_score"] >= 2 / 3, base["creativity_score"] < 1 / 3
    d1 = base.copy()
    d1.loc[high, "embedding_distance"] += 0.05 + rng.normal(0, 0.01, high.sum())
    d3 = base.copy()
    d3.loc[low, "self_bleu"] -= 0.05 + rng.normal(0, 0.01, low.sum())
    scores = {"base": base, "d1": d1, "d2": base.copy(), "d3": d3}
    comparisons = [Comparison("d1", "base", "base", "1"), Comparison("d1", "d2", "dataset 2", "1"),
                   Comparison("d2", "base", "base", "2"), Comparison("d3", "base", "base", "3")]
    return scores, paired_table(scores, comparisons, permutation_rounds=2000)


def test_plan_pairs_each_trained_model_with_its_base_and_its_quality_twin():
    entries = [Entry("base-a", "A"), Entry("base-b", "B"),
               Entry("d1-a", "A", "1", 1e-4, 0.1), Entry("d2-a", "A", "2", 1e-4, 0.1),
               Entry("d3-a", "A", "3", 1e-4, 0.1),
               Entry("d1-a-beta", "A", "1", 1e-4, 0.2), Entry("d1-b", "B", "1", 1e-4, 0.1)]
    planned = {(c.model, c.reference, c.versus, c.dataset) for c in plan_comparisons(entries)}
    assert planned == {("d1-a", "base-a", "base", "1"), ("d1-a", "d2-a", "dataset 2", "1"),
                       ("d2-a", "base-a", "base", "2"),
                       ("d3-a", "base-a", "base", "3"), ("d3-a", "d2-a", "dataset 2", "3"),
                       ("d1-a-beta", "base-a", "base", "1"),  # no dataset-2 model at beta 0.2
                       ("d1-b", "base-b", "base", "1")}


def test_runs_that_differ_in_loss_type_are_separate_conditions_never_pooled_seeds():
    """A loss_type sweep with two seeds each: four runs of dataset 1, two conditions of two seeds, each named by
    the setting that tells them apart; the dataset-2 twin is the one with the same loss."""
    entries = [Entry("base", "A"),
               *(Entry(f"d1-{loss}-s{seed}", "A", "1", 1e-3, 0.1, loss, seed)
                 for loss in ("sigmoid", "ipo") for seed in (0, 1)),
               *(Entry(f"d2-{loss}", "A", "2", 1e-3, 0.1, loss, 0) for loss in ("sigmoid", "ipo"))]
    planned = {(c.model_runs or (c.model,), c.reference_runs or (c.reference,), c.setting)
               for c in plan_comparisons(entries) if c.dataset == "1"}
    assert planned == {(("d1-sigmoid-s0", "d1-sigmoid-s1"), ("base",), "loss sigmoid"),
                       (("d1-ipo-s0", "d1-ipo-s1"), ("base",), "loss ipo"),
                       (("d1-sigmoid-s0", "d1-sigmoid-s1"), ("d2-sigmoid",), "loss sigmoid"),
                       (("d1-ipo-s0", "d1-ipo-s1"), ("d2-ipo",), "loss ipo")}
    # nothing varies but dataset and seed: no setting in any name (the prompting baseline trains nothing: its
    # settings are None, not a different value)
    baseline = Entry("prompted", "A", "prompt_baseline")
    assert {c.setting for c in plan_comparisons([e for e in entries if e.loss_type != "ipo"] + [baseline])} == {""}


def test_planted_shift_is_found_where_it_was_planted_and_nowhere_else(planted):
    _, table = planted
    found = table[table["significant"]]
    assert set(zip(found["model"], found["versus"], found["metric"], found["scope"])) == {
        ("d1", "base", "embedding_distance", "all"), ("d1", "base", "embedding_distance", "high"),
        ("d1", "dataset 2", "embedding_distance", "all"), ("d1", "dataset 2", "embedding_distance", "high"),
        ("d3", "base", "self_bleu", "all"), ("d3", "base", "self_bleu", "low")}
    high = table[(table["model"] == "d1") & (table["versus"] == "base") & (table["metric"] == "embedding_distance")
                 & (table["scope"] == "high")].iloc[0]
    assert high["num_pairs"] == 16 and 0.0 < high["ci_low"] < 0.05 < high["ci_high"]


def test_identical_models_show_no_change_at_all(planted):
    _, table = planted
    same = table[table["model"] == "d2"]
    assert len(same) == (6 + 2) * 4  # diversity + context metrics present (no mean_tokens) x (all + 3 buckets)
    assert (same["difference"] == 0).all() and (same["p_holm"] == 1.0).all() and not same["significant"].any()


def test_holm_runs_within_each_comparison_and_family(planted):
    _, table = planted
    for _, group in table.groupby(["model", "versus", "family"]):
        np.testing.assert_allclose(group["p_holm"], stats.holm(group["p_value"]))
    assert (table["p_holm"] >= table["p_value"]).all()


def test_bucket_edges_are_parameters(planted):
    scores, _ = planted
    table = paired_table(scores, [Comparison("d1", "base", "base", "1")], metrics=("embedding_distance",),
                         context_metrics=(), bucket_edges=(0.5,), bucket_names=("plain", "creative"),
                         permutation_rounds=2000)
    counts = table.set_index("scope")["num_pairs"]
    assert dict(counts) == {"all": 48, "plain": 24, "creative": 24}
    assert table.set_index("scope").loc["creative", "significant"]


def test_findings_say_what_moved_which_way_and_where(planted):
    _, table = planted
    text = findings_markdown(table, dataset_names={1: "embedding diversity", 2: "quality", 3: "LLM-judge diversity"})
    sections = dict(part.split("\n", 1) for part in text.split("### ")[1:])
    assert "more diverse on embedding_distance (all +" in sections["Dataset 1 (embedding diversity)"]
    assert "high +0.0" in sections["Dataset 1 (embedding diversity)"]
    assert "no significant change on vendi" in sections["Dataset 1 (embedding diversity)"]
    # Lower self-BLEU is more diversity: the direction comes from the metric's definition.
    assert "more diverse on self_bleu (all" in sections["Dataset 3 (LLM-judge diversity)"]
    assert "no diversity metric moved" in sections["Dataset 2 (quality)"]
    assert "length (words)" in sections["Dataset 2 (quality)"] and "quality (quality_logprob)" in text
    flipped = findings_markdown(table, higher_is_more_diverse={**diversity.HIGHER_IS_MORE_DIVERSE, "self_bleu": True})
    assert "less diverse on self_bleu" in flipped


def test_positive_control_sentence_says_whether_the_instrument_saw_a_change(planted):
    _, table = planted
    detected = positive_control_sentence(table, "d1")
    assert "detected a diversity change" in detected and "embedding_distance" in detected
    assert "did NOT detect" in positive_control_sentence(table, "d2")
    assert "untested" in positive_control_sentence(table, "no-such-model")


def test_plot_writes_a_png_of_the_paired_differences(planted, tmp_path):
    _, table = planted
    path = plot_paired_differences(table, tmp_path / "plots" / "paired_differences.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def length_only_samples(num_words: int, seed: int, num_prompts: int = 20, k: int = 4) -> pd.DataFrame:
    """k samples per prompt, words drawn uniformly from one shared vocabulary: only the length differs."""
    rng = np.random.default_rng(seed)
    vocabulary = [f"w{i}" for i in range(40)]
    return pd.DataFrame([{"prompt_id": f"p{p:02d}", "sample_index": s,
                          "text": " ".join(rng.choice(vocabulary, size=num_words))}
                         for p in range(num_prompts) for s in range(k)])


def scores_of(samples: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for index, (prompt_id, part) in enumerate(samples.groupby("prompt_id")):
        rows.append({"prompt_id": prompt_id, "creativity_score": (index + 0.5) / 20,
                     **diversity.score_samples(list(part["text"]))})
    return pd.DataFrame(rows)


def test_length_control_removes_a_change_that_is_only_length():
    samples = {"short": length_only_samples(12, seed=3), "long": length_only_samples(36, seed=4)}
    scores = {label: scores_of(frame) for label, frame in samples.items()}
    text_metrics = ("distinct_1", "distinct_2", "self_bleu", "compression_ratio")

    table = paired_table(scores, [Comparison("long", "short", "base", "1")], metrics=text_metrics,
                         context_metrics=("mean_words",), samples=samples, permutation_rounds=2000)

    assert (common_word_lengths(samples, ["long", "short"]) == 12).all()
    overall = table[table["scope"] == "all"].set_index(["family", "metric"])
    for metric in ("distinct_1", "distinct_2", "compression_ratio"):
        assert overall.loc[("diversity", metric), "significant"], metric  # the raw metric moves with length
    controlled = table[table["family"] == "length-controlled"]
    assert len(controlled) == 4 * 4 and not controlled["significant"].any()
    assert overall.loc[("context", "mean_words"), "difference"] == pytest.approx(24.0)
    sentence = findings_markdown(table)
    assert "distinct_1 all" in sentence and "no longer moves: a length effect" in sentence
    lengths = mean_lengths(scores).set_index("label")
    assert lengths.loc["long", "mean_words"] == 36.0 and np.isnan(lengths.loc["long", "mean_tokens"])


def test_an_empty_sample_leaves_its_prompt_out_of_the_length_controlled_test_only():
    samples = {"short": length_only_samples(12, seed=5), "long": length_only_samples(36, seed=6)}
    samples["long"].loc[0, "text"] = ""  # prompt p00: nothing left to compare at equal length
    scores = {label: scores_of(frame) for label, frame in samples.items()}

    table = paired_table(scores, [Comparison("long", "short", "base")], metrics=("distinct_1",), context_metrics=(),
                         samples=samples, permutation_rounds=2000)

    pairs = table[table["scope"] == "all"].set_index("family")["num_pairs"]
    assert dict(pairs) == {"diversity": 20, "length-controlled": 19}
    assert "### Other comparisons" in findings_markdown(table)  # a comparison without a dataset still reads


@dataclass(frozen=True)
class SeededEntry(Entry):
    seed: int | None = None


def test_seeds_form_one_condition_and_the_ci_resamples_them():
    """Three seeds of dataset 1 agree on +0.05 utility_k; three seeds of dataset 3 average +0.05 too, but one
    seed carries it all (+0.15, 0, 0): only the first counts under the two-level bootstrap."""
    entries = [Entry("base", "A")]
    for dataset in ("1", "2", "3"):
        entries += [SeededEntry(f"d{dataset}-s{s}", "A", dataset, 1e-4, 0.1, seed=s) for s in (2, 0, 1)]
    comparisons = plan_comparisons(entries)
    by_key = {(c.model, c.versus): c for c in comparisons}
    assert by_key[("d1-s0", "base")].model_runs == ("d1-s0", "d1-s1", "d1-s2")  # seed order, one condition
    assert by_key[("d1-s0", "dataset 2")].reference_runs == ("d2-s0", "d2-s1", "d2-s2")
    assert len(comparisons) == 5  # d1, d2, d3 vs base; d1, d3 vs dataset 2

    rng = np.random.default_rng(0)
    base = base_scores().assign(utility_k=rng.uniform(0.3, 0.6, NUM_PROMPTS))
    scores = {"base": base}
    for s, lucky in zip(range(3), (0.15, 0.0, 0.0)):
        noise = rng.normal(0, 0.01, (3, NUM_PROMPTS))
        scores[f"d1-s{s}"] = base.assign(utility_k=base["utility_k"] + 0.05 + noise[0])
        scores[f"d2-s{s}"] = base.assign(utility_k=base["utility_k"] + noise[1])
        scores[f"d3-s{s}"] = base.assign(utility_k=base["utility_k"] + lucky + noise[2])
    table = paired_table(scores, comparisons, metrics=(), context_metrics=(), permutation_rounds=500)
    overall = table[(table["scope"] == "all") & (table["metric"] == "utility_k")].set_index(["model", "versus"])
    d1, d3 = overall.loc[("d1-s0", "base")], overall.loc[("d3-s0", "base")]
    assert d1["num_seeds"] == 3 and d1["difference"] == pytest.approx(0.05, abs=0.005) and d1["counts"]
    assert d1["seed_sd"] < 0.005 and d1["p_seed"] == pytest.approx(0.25)  # 3 seeds: the smallest p there is
    assert d3["difference"] == pytest.approx(0.05, abs=0.005) and d3["seed_sd"] > 0.08
    assert d3["ci_low"] <= 0.0 + 0.005 and not d3["counts"]  # the lucky seed alone does not carry it
    # A prompt-only test of the seed-averaged differences would have called d3 significant.
    assert d3["significant"]
    versus_2 = overall.loc[("d1-s0", "dataset 2")]
    assert versus_2["counts"] and versus_2["p_seed"] == pytest.approx(0.1)  # C(6,3) = 20 relabellings


def test_model_size_compares_each_datasets_effect_between_base_models():
    """Dataset 1 adds +0.10 utility_k on the 1.7B model and +0.02 on the 135M one: a difference of +0.08 that
    counts; dataset 2 adds +0.03 on both: no difference. The smaller model comes first by parameter count."""
    from dpo_core.findings import parameter_count, size_sentences, size_table

    assert parameter_count("HuggingFaceTB/SmolLM2-135M-Instruct") == 1.35e8
    assert parameter_count("Qwen/Qwen3-30B-A3B-Instruct-2507") == 3e10 and parameter_count("local/tiny") == 0
    entries = [Entry("big (base)", "org/Model-1.7B"), Entry("small (base)", "org/Model-135M")]
    for model, tag in (("org/Model-1.7B", "big"), ("org/Model-135M", "small")):
        entries += [Entry(f"d{d}-{tag}", model, d, 1e-4, 0.1) for d in ("1", "2")]
    comparisons = plan_comparisons(entries)
    rng = np.random.default_rng(0)
    scores = {}
    for tag in ("big", "small"):
        base = base_scores().assign(utility_k=rng.uniform(0.3, 0.6, NUM_PROMPTS))
        scores[f"{tag} (base)"] = base
        gain = 0.10 if tag == "big" else 0.02
        scores[f"d1-{tag}"] = base.assign(utility_k=base["utility_k"] + gain + rng.normal(0, 0.01, NUM_PROMPTS))
        scores[f"d2-{tag}"] = base.assign(utility_k=base["utility_k"] + 0.03 + rng.normal(0, 0.01, NUM_PROMPTS))
    table = size_table(scores, comparisons).set_index(["dataset", "versus"])
    d1 = table.loc[("1", "base")]
    assert (d1["smaller"], d1["larger"]) == ("org/Model-135M", "org/Model-1.7B")
    assert d1["difference"] == pytest.approx(0.08, abs=0.01) and d1["counts"] and d1["ci_low"] > 0.05
    assert table.loc[("2", "base")]["difference"] == pytest.approx(0.0, abs=0.01)
    assert not table.loc[("2", "base")]["counts"]
    assert table.loc[("1", "dataset 2")]["difference"] == pytest.approx(0.08, abs=0.01)
    sentence = size_sentences(table.reset_index().iloc[:1], {"1": "Dataset 1"})[0]
    assert sentence.startswith("Dataset 1: its effect on utility_k vs base differs between Model-135M and Model-1.7B")
