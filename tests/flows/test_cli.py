"""The entry points as a user runs them (subprocesses): `--help` and `help`, and configuration errors as one line.

A configuration error (a bad key, a bad value, too few steps, a missing dataset, a bad dataset row) must end the
command with exactly one `error:` line on stderr and exit code 1: no Prefect traceback, no flow run, nothing
written. `--help` must answer before Prefect (or torch) is imported, and never start Prefect's server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core.config import EvalConfig, TrainConfig
from dpo_core.pairs import PairsConfig
from dpo_core.plan import SuiteConfig

ROOT = Path(__file__).resolve().parents[2]

# Runs an entry point as `__main__` in this interpreter and reports what it had imported when it exited.
_IMPORTS_AT_EXIT = """
import atexit, json, runpy, sys
def report():
    from flows import prefect_server
    print(json.dumps({"prefect": "prefect" in sys.modules, "torch": "torch" in sys.modules,
                      "server_started": prefect_server._early is not None}), file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_API_KEY", "PREFECT_API_URL", "DPO_DEBUG")}
    env.update({"DPO_EXPERIMENTS_DIR": str(tmp_path / "experiments"), "DPO_LOCAL_STORAGE": str(tmp_path / "storage"),
                "PREFECT_HOME": str(tmp_path / "prefect"), "DPO_BACKEND": "local", "PYTHONPATH": str(ROOT), **extra})
    return env


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script, model", [("flows/train.py", TrainConfig), ("scripts/train_dpo.py", TrainConfig),
                                           ("flows/suite.py", SuiteConfig), ("flows/evaluate.py", EvalConfig),
                                           ("flows/pairs.py", PairsConfig)])
@pytest.mark.parametrize("asked", ["--help", "help"])
def test_entry_point_help_lists_every_key_without_importing_prefect_or_torch(script, model, asked, tmp_path):
    done = _run(["-c", _IMPORTS_AT_EXIT, script, asked], _env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"usage: .venv/bin/python {script} ")
    for name in model.model_fields:
        assert f"\n  {name} " in done.stdout, f"{script} {asked} misses {name}"
    imported = json.loads(done.stderr.strip().splitlines()[-1])
    assert imported == {"prefect": False, "torch": False, "server_started": False}


@pytest.mark.parametrize("args", [["-m", "dpo_core", "--help"], ["-m", "dpo_core", "help"],
                                  ["-m", "dpo_core", "prime-hf-cache", "--help"],
                                  ["-m", "dpo_core.local", "serve", "--help"], ["-m", "dpo_core.local", "help"]])
def test_library_commands_answer_help(args, tmp_path):
    done = _run(args, _env(tmp_path))
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m dpo_core"), done.stderr[-2000:]
    if args[1] == "dpo_core.local":  # the server's settings, generated from Settings
        assert "DPO_LOCAL_MICRO_BATCH_TOKENS  int; default 4096" in done.stdout
        assert "DPO_LOCAL_MAX_TRAINING_MODELS" in done.stdout


@pytest.mark.parametrize("asked", ["help", "--help"])
def test_deployment_script_answers_help_without_starting_anything(asked, tmp_path):
    env = _env(tmp_path)
    done = subprocess.run(["bash", "deployments/dpo.sh", asked], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert "deployments/dpo.sh up" in done.stdout and "DPO_WORKERS" in done.stdout
    assert not (tmp_path / "prefect").exists()  # no PREFECT_HOME created, no server


def _bad_jsonl(tmp_path: Path) -> Path:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hello", "chosen": "Hi there.", "rejected": "Hi!"}) + "\n"
                   + json.dumps({"prompt": "Tell me a joke", "chosen": "A pun.", "rejected": ""}) + "\n")
    return bad


TRAIN_ERRORS = {
    "bad key": (["dataset=1", "betta=0.2"], "unknown key 'betta' (did you mean 'dpo_beta'?)"),
    "bad value": (["dataset=1", "dpo_beta=-1"], "dpo_beta: Input should be greater than 0"),
    "too few steps": (["dataset=1"], "make 1 optimizer step (fewer than 10); use batch_size="),
    "missing dataset": (["dataset={tmp}/nowhere.parquet", "batch_size=4"], "Dataset file not found"),
    "bad dataset row": (["dataset={tmp}/bad.jsonl", "allow_few_steps=true"], "row 1, column 'rejected': is empty"),
}


@pytest.mark.parametrize("case", list(TRAIN_ERRORS))
def test_train_configuration_error_is_one_line_without_traceback(case, tmp_path):
    _bad_jsonl(tmp_path)
    args, expected = TRAIN_ERRORS[case]
    done = _run(["flows/train.py", "model_name=local/tiny", *(a.format(tmp=tmp_path) for a in args)],
                _env(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert "flow run" not in done.stdout + done.stderr  # refused before Prefect ran anything
    assert not (tmp_path / "experiments").exists()


SUITE_ERRORS = {
    "bad key": (["dpo_betas=0.1"], "unknown key 'dpo_betas' (did you mean 'dpo_beta'?)"),
    "bad value": (["datasets=1,4"], "dataset must be 1, 2, 3"),
    "too few steps": (["datasets=1", "batch_size=256"], "make 1 optimizer step (fewer than 10)"),
    "missing dataset": (["datasets={tmp}/nowhere.parquet"], "nothing to run: Dataset file not found"),
    "bad dataset row": (["datasets={tmp}/bad.jsonl"], "nothing to run: {tmp}/bad.jsonl, row 1, column 'rejected'"),
}


@pytest.mark.parametrize("case", list(SUITE_ERRORS))
def test_suite_configuration_error_is_one_line_without_traceback(case, tmp_path):
    _bad_jsonl(tmp_path)
    args, expected = SUITE_ERRORS[case]
    done = _run(["flows/suite.py", "models=local/tiny", *(a.format(tmp=tmp_path) for a in args)], _env(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert expected.format(tmp=tmp_path) in done.stderr and "Traceback" not in done.stderr
    assert "flow run" not in done.stdout + done.stderr
    assert not (tmp_path / "experiments").exists()


def test_debug_flag_shows_the_traceback_of_a_configuration_error(tmp_path):
    done = _run(["flows/train.py", "model_name=local/tiny", "dataset=1", "--debug"], _env(tmp_path))
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr and "fewer than 10" in done.stderr


@pytest.mark.minutes(1)
def test_user_error_inside_the_flow_run_is_logged_without_its_traceback(tmp_path, registered):
    """An error only the service can find (a model it does not serve) surfaces inside the flow run: its message
    ends the command as the `error:` line, and Prefect's console log carries no traceback for it."""
    done = _run(["flows/train.py", "model_name=nobody/no-such-model", "dataset=1", "batch_size=8"],
                _env(tmp_path, DPO_CACHE_DIR=str(registered)), timeout=600)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()
    assert any(line.startswith("error: model 'nobody/no-such-model' is not served by the local server")
               for line in last), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
