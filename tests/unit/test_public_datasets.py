"""The public sets' converters, each on a small fixture in its source schema (no download), and `dataset=NAME`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dpo_core import data
from dpo_core.config import TrainConfig
from dpo_core.public_datasets import DatasetNotCachedError, is_public_spec

HH = [
    # A two-turn transcript: the prompt keeps the first exchange; the answers are the last assistant turns.
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant: Blue.",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant: "
                 "I won't."},
    {"chosen": "\n\nHuman: What is 2+2? Human: is a word here.\n\nAssistant: 4",
     "rejected": "\n\nHuman: What is 2+2? Human: is a word here.\n\nAssistant: 5"},
    # Malformed: the transcripts differ before the last assistant turn.
    {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"},
    # Identical answers: no preference.
    {"chosen": "\n\nHuman: Same\n\nAssistant: x", "rejected": "\n\nHuman: Same\n\nAssistant: x"},
]
HELPSTEER3 = [
    {"domain": "general", "context": [{"role": "user", "content": "Write a haiku."}],
     "response1": "An old pond, a frog", "response2": "Haiku.", "overall_preference": -2},
    {"domain": "general", "context": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                      {"role": "user", "content": "Say bye."}],
     "response1": "no", "response2": "Goodbye!", "overall_preference": 3},
    {"domain": "general", "context": [{"role": "user", "content": "Tie?"}], "response1": "a", "response2": "b",
     "overall_preference": 0},
]
ULTRA_ARGILLA = [{"instruction": "Explain DPO.", "chosen_response": "DPO fits a policy to preferences.",
                  "rejected_response": "No.", "chosen_rating": 5, "rejected_rating": 1}]
ULTRA_H4 = [
    {"prompt": "Capital of France?", "chosen": [{"role": "user", "content": "Capital of France?"},
                                                 {"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon."}],
     "score_chosen": 9.0, "score_rejected": 2.0},
    {"prompt": "Tie", "chosen": [{"role": "user", "content": "Tie"}, {"role": "assistant", "content": "a"}],
     "rejected": [{"role": "user", "content": "Tie"}, {"role": "assistant", "content": "b"}],
     "score_chosen": 5.0, "score_rejected": 5.0},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _convert(tmp_path, name, rows, suffix=".jsonl"):
    source = tmp_path / f"source{suffix}"
    if suffix == ".jsonl":
        _jsonl(source, rows)
    else:
        pd.DataFrame(rows).to_parquet(source)
    path = data.resolve_dataset(f"{name}:{source}", tmp_path / "data", tmp_path / "cache")
    summary = json.loads(path.with_suffix(".json").read_text())
    return data.load_pairs(path), summary, path


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(tmp_path):
    pairs, summary, _ = _convert(tmp_path, "hh-rlhf", HH)
    assert [m["role"] for m in pairs[0].prompt] == ["user", "assistant", "user"]
    assert pairs[0].prompt[-1]["content"] == "Name a colour."
    assert (pairs[0].chosen, pairs[0].rejected) == (({"role": "assistant", "content": "Blue."},),
                                                    ({"role": "assistant", "content": "I won't."},))
    # "Human:" inside a turn is text, not a new turn.
    assert pairs[1].prompt == ({"role": "user", "content": "What is 2+2? Human: is a word here."},)
    assert summary["pairs"] == 2 and summary["source_rows"] == 4
    assert summary["dropped"] == {"transcripts differ before the last assistant turn": 1,
                                  "chosen identical to rejected": 1}


def test_helpsteer3_preference_sign_picks_chosen_and_ties_are_dropped_and_counted(tmp_path):
    pairs, summary, _ = _convert(tmp_path, "helpsteer3", HELPSTEER3, suffix=".parquet")
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        ("An old pond, a frog", "Haiku."), ("Goodbye!", "no")]  # -2: response1 better; +3: response2 better
    assert [m["role"] for m in pairs[1].prompt] == ["user", "assistant", "user"]
    assert summary["dropped"] == {"tie (overall_preference 0)": 1}


def test_ultrafeedback_either_schema_becomes_explicit_messages(tmp_path):
    pairs, _, _ = _convert(tmp_path, "ultrafeedback", ULTRA_ARGILLA)
    assert pairs[0].prompt == ({"role": "user", "content": "Explain DPO."},)
    assert pairs[0].chosen[0]["content"] == "DPO fits a policy to preferences."
    (tmp_path / "h4").mkdir()
    pairs, summary, _ = _convert(tmp_path / "h4", "ultrafeedback", ULTRA_H4, suffix=".parquet")
    # H4 repeats the prompt at the head of chosen/rejected: only the answers remain.
    assert [(p.prompt[0]["content"], p.chosen, p.rejected) for p in pairs] == [
        ("Capital of France?", ({"role": "assistant", "content": "Paris."},),
         ({"role": "assistant", "content": "Lyon."},))]
    assert summary["dropped"] == {"tie (score_chosen = score_rejected)": 1}


def test_a_converted_set_goes_through_the_same_validation_and_notes_its_drops(tmp_path):
    from dpo_core.experiment import validate_dataset
    from dpo_core.settings import Settings

    source = _jsonl(tmp_path / "hh.jsonl", HH)
    settings = Settings(data_dir=tmp_path, cache_dir=tmp_path / "cache")
    validated = validate_dataset(f"hh-rlhf:{source}", settings)
    assert validated.rows == 2 and validated.path.startswith(str(tmp_path / "cache" / "datasets"))
    assert "Converted from" in validated.report_markdown and "1 chosen identical to rejected" in validated.report_markdown
    # Converted once: the same file (and hash) the second time, so a rerun resumes the same experiment.
    again = validate_dataset(f"hh-rlhf:{source}", settings)
    assert (again.path, again.sha256) == (validated.path, validated.sha256)
    assert TrainConfig(model_name="local/tiny", dataset=f"hh-rlhf:{source}").dataset == f"hh-rlhf:{source}"


def test_a_source_file_in_the_wrong_schema_is_refused_naming_it(tmp_path):
    source = _jsonl(tmp_path / "wrong.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(data.DatasetError, match="no usable preference pair.*KeyError"):
        data.resolve_dataset(f"helpsteer3:{source}", tmp_path, tmp_path / "cache")


def test_a_set_that_is_not_cached_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotCachedError) as caught:
        data.resolve_dataset("hh-rlhf", tmp_path, tmp_path / "cache")  # an empty HF cache: conftest's HF_HOME
    message = str(caught.value)
    assert "Anthropic/hh-rlhf" in message and "not in the local HF datasets cache" in message
    assert "datasets.load_dataset('Anthropic/hh-rlhf', split='train')" in message and "hh-rlhf:PATH" in message
    assert isinstance(caught.value, FileNotFoundError)  # the suite skips it like a missing dataset file
    with pytest.raises(DatasetNotCachedError, match="nvidia/HelpSteer3"):
        data.resolve_dataset("helpsteer3:validation", tmp_path, tmp_path / "cache")


def test_public_specs_are_recognised_and_paths_win(tmp_path):
    assert is_public_spec("hh-rlhf") and is_public_spec("hf:org/set:test") and is_public_spec("helpsteer3:x.jsonl")
    assert not is_public_spec("data/d.parquet") and not is_public_spec(1) and not is_public_spec("hf")


def _hf_datasets_cache(cache: Path, repo: str, config: str | None, rows: list[dict]) -> None:
    """What `datasets.load_dataset(repo, config)` leaves in the HF datasets cache, built offline from `rows` (a json
    dataset's cache folder, renamed as the cache loader looks it up): no download, the real loader reads it."""
    import glob
    import os
    import shutil

    import datasets
    from datasets.naming import camelcase_to_snakecase

    org, name = repo.split("/")
    builder = camelcase_to_snakecase(name)
    build = cache.parent / f"build-{builder}"
    build.mkdir()
    source = build / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.load_dataset("json", data_files={"train": str(source)}, cache_dir=str(build))
    [built] = [Path(p) for p in glob.glob(str(build / "json" / "*" / "*" / "*")) if os.path.isdir(p)]
    target = cache / f"{org}___{builder}" / (config or "default") / built.parts[-2] / built.parts[-1]
    shutil.copytree(built, target)
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": config or "default",
                                                          "builder_name": builder}))
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{builder}-"))


def test_a_named_set_loads_from_the_hf_datasets_cache(tmp_path, monkeypatch):
    from datasets import config as datasets_config

    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    (tmp_path / "hf").mkdir()
    _hf_datasets_cache(tmp_path / "hf", "nvidia/HelpSteer3", "preference", HELPSTEER3)
    path = data.resolve_dataset("helpsteer3", tmp_path / "data", tmp_path / "cache")
    pairs = data.load_pairs(path)
    assert [p.chosen[0]["content"] for p in pairs] == ["An old pond, a frog", "Goodbye!"]
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["source"] == "nvidia/HelpSteer3 (preference, train)" and summary["dropped"] == {
        "tie (overall_preference 0)": 1}
    # hf:NAME for a set already in the conversational format (H4's UltraFeedback layout).
    _hf_datasets_cache(tmp_path / "hf", "someone/prefs", None, ULTRA_H4[:1])
    [pair] = data.load_pairs(data.resolve_dataset("hf:someone/prefs", tmp_path / "data", tmp_path / "cache"))
    assert pair.prompt[0]["content"] == "Capital of France?" and pair.chosen[0]["content"] == "Paris."
