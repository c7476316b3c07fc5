"""Two whole suites started at the same moment on the same data: separate, complete run folders, one consistent
checkpoint index, and a complete report (reliability item 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core import checkpoints, data

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.minutes(4)
def test_two_suites_at_once_get_separate_complete_runs(tmp_path, registered):
    pairs = data.load_pairs(data.resolve_dataset(1, ROOT / "data"))[:8]
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p.prompt_text(), "chosen": p.chosen[0]["content"],
                                           "rejected": p.rejected[0]["content"]}) + "\n" for p in pairs))
    shared = {"DPO_EXPERIMENTS_DIR": str(tmp_path / "experiments"), "DPO_LOCAL_STORAGE": str(tmp_path / "storage"),
              "DPO_CACHE_DIR": str(registered), "DPO_BACKEND": "local", "DPO_DATA_DIR": str(ROOT / "data")}
    command = [sys.executable, str(ROOT / "flows" / "suite.py"), f"datasets={dataset}", "models=local/tiny",
               "batch_size=4", "allow_few_steps=true",  # 2 steps: two suites at once are under test, not learning
               "max_length=128", "eval_num_samples=2", "eval_max_prompts=2", "eval_max_tokens=4",
               f"report_dir={tmp_path / 'report'}"]
    processes = []
    for name in ("a", "b"):  # two terminals: each its own Prefect database and result store
        env = {**os.environ, **shared, "PREFECT_HOME": str(tmp_path / f"prefect-{name}"),
               "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / f"results-{name}")}
        processes.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]

    runs = sorted((tmp_path / "experiments").glob("dataset-pairs_*"))
    assert [r.name.endswith("_2") for r in runs] == [False, True], [r.name for r in runs]
    index = checkpoints.list_experiments(tmp_path / "experiments")
    assert sorted(e.name for e in index) == [r.name for r in runs]
    sampler_paths = set()
    for run_dir, entry in zip(runs, sorted(index, key=lambda e: e.name)):
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [0, 1]  # 8 pairs / batch 4: each step exactly once
        records = [json.loads(line) for line in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
        assert [r["name"] for r in records] == ["final"]
        assert entry.status == "finished" and entry.steps_done == 2
        assert entry.sampler_path == records[-1]["sampler_path"]
        assert json.loads((run_dir / "config.json").read_text())["dataset_path"] == str(dataset)
        assert list((run_dir / "eval").glob("final_*/summary.json")), "each run is evaluated"
        sampler_paths.add(records[-1]["sampler_path"])
    assert len(sampler_paths) == 2  # two checkpoints, neither overwrote the other
    # The base model is evaluated once: the other suite waits for that evaluation and reuses its folder (before,
    # it sampled again and swapped the folder out while the first suite's report was reading it).
    assert sum(output.count("(base): reusing the evaluation") for output in outputs) == 1, outputs
    base_evaluations = (tmp_path / "experiments" / "base_models").glob("*/eval_*")
    assert len([p for p in base_evaluations if "_prompted-" not in p.name]) == 1
    for path in sampler_paths:  # both checkpoints' files are in the shared storage
        run_id, kind, name = path.removeprefix("tinker://").split("/")
        assert (tmp_path / "storage" / "runs" / run_id / kind / name / "adapter_model.safetensors").exists()
    # The shared report is one suite's complete report (written atomically), never a mix or a half.
    report = (tmp_path / "report" / "report.md").read_text()
    assert any(r.name in report for r in runs)
    assert (tmp_path / "report" / "table.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
