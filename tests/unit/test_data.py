"""Dataset registry, loaders (parquet, jsonl, HF folder) and one bad file per validation rule."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from dpo_core import __main__ as cli
from dpo_core.data import DatasetError, DatasetNotFoundError, content_hash, load_eval_prompts, resolve_dataset
from dpo_core.dataset_checks import validate

DATA = Path(__file__).resolve().parents[2] / "data"
GOOD = [
    {"prompt": f"Prompt {i}", "chosen": f"A careful answer {i}", "rejected": f"meh {i}"} for i in range(10)
]


def _parquet(tmp_path, rows, name="d.parquet") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_parquet(path)
    return path


def _jsonl(tmp_path, rows, name="d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bad(rows, index, **change):
    rows = [dict(r) for r in rows]
    rows[index].update(change)
    return rows


@pytest.mark.parametrize("number", [1, 2, 3])
def test_shipped_datasets_are_valid(number):
    pairs, report = validate(resolve_dataset(number, DATA))
    assert report.rows >= 140 and len(pairs) == report.rows and not report.warnings


def test_shipped_datasets_hold_out_28_pairs_at_the_local_default_and_were_built_with_pair_hygiene():
    """What the default suite's held-out goal rests on (issue 15): 28 held-out pairs per dataset (16 could not
    resolve ~0.7 from chance), and the files are the hygiene run's output: no text cut at the token cap."""
    from dpo_core.config import TrainConfig, num_steps
    from dpo_core.data import CONTROL_DATASET_FILE, DATASET_FILES, held_out_split
    from dpo_core.plan import LOCAL_DEFAULTS

    defaults = TrainConfig(model_name="m/x", dataset=1)
    summary = json.loads((DATA / "pairs_summary.json").read_text())
    assert summary["config"]["exclude_truncated"] is True and summary["truncated_candidates"]["excluded"] is True
    texts = set()
    for number, name in DATASET_FILES.items():
        frame = pd.read_parquet(DATA / name)
        assert len(frame) == summary["per_dataset"][str(number)]["pairs"]  # the summary describes these files
        assert not (frame["chosen_truncated"] | frame["rejected_truncated"]).any(), name
        texts |= set(frame["chosen"]) | set(frame["rejected"])
    control = pd.read_parquet(DATA / CONTROL_DATASET_FILE)
    assert set(control["chosen"]) | set(control["rejected"]) <= texts  # built from the datasets' texts only
    for name in (*DATASET_FILES.values(), CONTROL_DATASET_FILE):
        pairs, _ = validate(DATA / name)
        train, held = held_out_split(pairs, LOCAL_DEFAULTS["held_out_fraction"], defaults.held_out_min_pairs,
                                     defaults.seed)
        assert len(held) >= 28, name
        assert num_steps(len(train), LOCAL_DEFAULTS["batch_size"], 1) >= 10, name


def test_shipped_eval_prompts_span_creativity_and_do_not_overlap_training():
    prompts = load_eval_prompts(DATA / "eval_prompts.parquet")
    scores = [p.creativity_score for p in prompts]
    assert len(prompts) >= 40 and min(scores) == 0.0 and max(scores) == 1.0
    training = {p.prompt_text() for n in (1, 2, 3) for p in validate(resolve_dataset(n, DATA))[0]}
    assert not training & {p.prompt for p in prompts}


def test_registry_and_seed_error(tmp_path):
    assert resolve_dataset(2, DATA).name == "dataset2_quality_based.parquet"
    with pytest.raises(DatasetNotFoundError, match=r"^Dataset file not found: .*dataset3_llm_judge_diversity\.parquet"):
        resolve_dataset(3, tmp_path)
    with pytest.raises(ValueError, match="1, 2, 3"):
        resolve_dataset(4, DATA)


def test_three_formats_load_the_same_pairs(tmp_path):
    parquet = _parquet(tmp_path, GOOD)
    jsonl = _jsonl(tmp_path, GOOD)
    folder = tmp_path / "hf"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(folder))
    loaded = [validate(p)[0] for p in (parquet, jsonl, folder)]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][3].chosen == ({"role": "assistant", "content": "A careful answer 3"},)


def test_chat_message_lists_are_accepted(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"}],
             "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}], "creativity_score": 0.5}
            for i in range(3)]
    pairs, report = validate(_parquet(tmp_path, rows))
    assert pairs[1].prompt[0]["role"] == "system" and pairs[1].creativity_score == 0.5
    assert report.unique_prompts == 3


@pytest.mark.parametrize("rows, row, column, message", [
    ([{k: v for k, v in r.items() if k != "chosen"} for r in GOOD], None, "chosen", "is missing"),
    (_bad(GOOD, 7, chosen=None), 7, "chosen", "is null"),
    (_bad(GOOD, 4, rejected="   "), 4, "rejected", "is empty"),
    (_bad(GOOD, 2, prompt=42), 2, "prompt", "has type int"),
    (_bad(GOOD, 5, rejected="A  careful answer 5 "), 5, "rejected", "identical to rejected"),
    (_bad(GOOD, 3, chosen=[{"role": "wizard", "content": "x"}]), 3, "chosen", "role 'wizard'"),
    (_bad(GOOD, 6, creativity_score=1.7), 6, "creativity_score", r"in \[0, 1\]"),
    (GOOD[:2] * 5, 2, "prompt", "duplicate"),
])
def test_each_rule_names_row_and_column(tmp_path, rows, row, column, message):
    if any("creativity_score" in r for r in rows):
        rows = [{**r, "creativity_score": r.get("creativity_score", 0.5)} for r in rows]
    path = _jsonl(tmp_path, rows)  # jsonl: mixed types per column are possible there
    with pytest.raises(DatasetError, match=message) as info:
        validate(path)
    error = info.value
    assert error.row == row and error.column == column and str(path) in str(error)
    assert "\n" not in str(error)


def test_zero_rows_and_corrupt_and_non_utf8(tmp_path):
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": [], "chosen": [], "rejected": []}).to_parquet(empty)
    with pytest.raises(DatasetError, match="zero rows"):
        validate(empty)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match="could not be read as parquet"):
        validate(corrupt)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DatasetError, match="not valid UTF-8") as info:
        validate(latin)
    assert info.value.row == 1


def test_few_duplicates_warn_only(tmp_path):
    _, report = validate(_parquet(tmp_path, GOOD + GOOD[:1]))
    assert report.duplicates == 1 and "duplicate" in report.warnings[0]


def test_truncation_rules(tmp_path):
    rows = [{"prompt": "p " * 10, "chosen": "same start then yes indeed", "rejected": "same start then no"}]
    path = _parquet(tmp_path, rows)

    def tokenize(pair):  # one token per word, prompt first: what the renderer would do
        prompt = pair.prompt_text().split()
        return prompt + pair.chosen[0]["content"].split(), prompt + pair.rejected[0]["content"].split(), len(prompt)

    _, report = validate(path, max_length=14, tokenize_pair=tokenize)
    assert report.truncated_rows == 1 and "truncated" in report.warnings[0]
    with pytest.raises(DatasetError, match="identical after truncation") as info:
        validate(path, max_length=12, tokenize_pair=tokenize)
    assert info.value.row == 0


def test_content_hash_follows_bytes(tmp_path):
    a = _parquet(tmp_path, GOOD, "a.parquet")
    b = _parquet(tmp_path, GOOD, "b.parquet")
    c = _parquet(tmp_path, _bad(GOOD, 0, chosen="changed"), "c.parquet")
    assert content_hash(a) != content_hash(c)
    assert len(content_hash(b)) == 64


def test_validate_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(DATA.parent)
    assert cli.main(["validate", "1"]) == 0
    assert "valid: yes" in capsys.readouterr().out
    bad = _parquet(tmp_path, _bad(GOOD, 7, chosen=None))
    assert cli.main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 7" in err and "column 'chosen'" in err
    assert cli.main(["validate", "4"]) == 1


def test_dataset_errors_survive_pickling():
    """A Dask worker validates: the error that comes back is the same error, with its parts."""
    import pickle

    from dpo_core.data import DatasetError, DatasetNotFoundError

    error = DatasetError("pairs.jsonl", "is null", row=4, column="rejected", hint="every pair needs all three texts")
    back = pickle.loads(pickle.dumps(error))
    assert (type(back), str(back), back.row, back.column) == (DatasetError, str(error), 4, "rejected")
    missing = pickle.loads(pickle.dumps(DatasetNotFoundError("nowhere.parquet")))
    assert (type(missing), str(missing), missing.path) == (DatasetNotFoundError, str(DatasetNotFoundError("nowhere.parquet")),
                                                          "nowhere.parquet")
