"""A corpus of bad datasets and bad command lines: each gets one clear line naming file/row/column or key,
exit code 1, and leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from dpo_core import __main__ as validate_cli

# Imported at collection, not inside a test: Prefect binds its console log handler to the stderr of the moment,
# and a test's captured stream is closed afterwards.
from flows.suite import main as suite_main  # noqa: E402
from flows.train import main as train_main  # noqa: E402

GOOD = {"prompt": "Name a colour.", "chosen": "Blue, like the sea.", "rejected": "No."}


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


DATASETS = {
    "missing_column": (lambda p: p.write_text(_jsonl([{"prompt": "x", "chosen": "y"}])), "column 'rejected'"),
    "null_text": (lambda p: p.write_text(_jsonl([GOOD, {**GOOD, "chosen": None}])), "row 1, column 'chosen'"),
    "wrong_type": (lambda p: p.write_text(_jsonl([{**GOOD, "prompt": 7}])), "row 0, column 'prompt'"),
    "chosen_equals_rejected": (lambda p: p.write_text(_jsonl([{**GOOD, "rejected": GOOD["chosen"] + "  "}])),
                               "identical to rejected"),
    "empty_text": (lambda p: p.write_text(_jsonl([{**GOOD, "rejected": " "}])), "row 0, column 'rejected'"),
    "bad_role": (lambda p: p.write_text(_jsonl([{**GOOD, "chosen": [{"role": "robot", "content": "hi"}]}])),
                 "role 'robot'"),
    "creativity_out_of_range": (lambda p: p.write_text(_jsonl([{**GOOD, "creativity_score": 3}])),
                                "column 'creativity_score'"),
    "many_duplicates": (lambda p: p.write_text(_jsonl([GOOD] * 5)), "duplicate"),
    "not_json": (lambda p: p.write_text(_jsonl([GOOD]) + "{not json\n"), "row 1"),
    "non_utf8": (lambda p: p.write_bytes(_jsonl([GOOD]).encode() + b'{"prompt": "caf\xe9"}\n'), "not valid UTF-8"),
    "zero_rows": (lambda p: p.write_text(""), "zero rows"),
    "corrupt_parquet": (lambda p: p.with_suffix(".parquet").write_bytes(b"PAR1garbage"), "could not be read as parquet"),
    "missing_file": (lambda p: None, "Dataset file not found"),
}


@pytest.mark.parametrize("case", sorted(DATASETS))
def test_bad_dataset_gets_one_clear_line(case, tmp_path, capsys):
    make, expected = DATASETS[case]
    path = tmp_path / f"{case}.jsonl"
    make(path)
    if case == "corrupt_parquet":
        path = path.with_suffix(".parquet")
    before = sorted(tmp_path.rglob("*"))
    assert validate_cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err
    if case != "missing_file":
        assert str(path) in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_identical_after_truncation_is_refused(tmp_path, capsys, registered):
    path = tmp_path / "long_prompt.jsonl"
    path.write_text(_jsonl([{"prompt": "word " * 40, "chosen": "Yes indeed.", "rejected": "No way."}]))
    assert validate_cli.main(["validate", str(path), "--max-length", "24"]) == 1
    err = capsys.readouterr().err
    assert "row 0" in err and "identical after truncation to max_length=24" in err


@pytest.mark.parametrize("args, expected", [
    (["model_name=local/tiny", "dataset=4"], "dataset must be 1, 2, 3"),
    (["model_name=local/tiny", "dataset=1", "dpo_beta=-0.5"], "dpo_beta"),
    (["model_name=local/tiny", "dataset=1", "learning_rate=0"], "learning_rate"),
    (["model_name=local/tiny", "dataset=1", "batch_size=0"], "batch_size"),
    (["model_name=local/tiny", "dataset=1", "lora_rank=x"], "lora_rank"),
    (["model_name=local/tiny", "dataset=1", "lr=1e-4"], "unknown key 'lr'"),
    (["model_name=local/tiny"], "dataset"),
    (["dataset=1"], "model_name"),
])
def test_bad_command_line_gets_one_clear_line(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert list(tmp_path.iterdir()) == []  # no run folder, no cache entry


def test_suite_rejects_bad_lists(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert suite_main(["datasets=1,4"]) == 1
    assert "dataset must be 1, 2, 3" in capsys.readouterr().err
