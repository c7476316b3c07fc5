"""One evaluation folder, one writer: two suites that evaluate the same base model at once (one experiments
folder) take turns, and the second reuses what the first wrote instead of sampling again and swapping the folder
out while the first one's report reads it. A folder is reused only when its summary says this code computed it
for this model, checkpoint, label and settings."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from dpo_core import backend, evaluate, experiment
from dpo_core.config import EvalConfig
from dpo_core.data import EvalPrompt
from dpo_core.settings import Settings

TINY = "local/tiny"
CONFIG = EvalConfig(num_samples=2, max_tokens=4, max_prompts=2, bootstrap=100, quality_judge=False)


def test_a_finished_evaluation_is_reused_and_a_concurrent_one_waits_for_it(tmp_path, registered, shipped_data):
    settings = Settings(cache_dir=registered, local_storage=tmp_path / "storage",
                        experiments_dir=tmp_path / "experiments", data_dir=shipped_data)
    request = experiment.EvalRequest(label="base", model_name=TINY)
    with backend.Backend() as entered:
        counters = entered.local_server(settings).engine.counters
        first = experiment.evaluate_model(request, CONFIG, settings)
        summary = json.loads((Path(first) / "summary.json").read_text())
        assert summary["code"] and summary["label"] == "base"
        sampled = counters["sample_requests"]

        # Another process is evaluating into the same folder: this one waits for it, then reuses its result.
        done: list[str] = []
        with experiment._evaluation_lock(first, settings):
            waiter = threading.Thread(target=lambda: done.append(experiment.evaluate_model(request, CONFIG,
                                                                                            settings)))
            waiter.start()
            waiter.join(timeout=2)
            assert waiter.is_alive() and not done  # it cannot pass the lock this block holds
        waiter.join(timeout=300)
        assert done == [first]
        assert counters["sample_requests"] == sampled  # reused: nothing sampled again

        # Another label for the same model is another summary: evaluated again (same folder, new files).
        relabelled = experiment.evaluate_model(request.model_copy(update={"label": "base model"}), CONFIG, settings)
        assert relabelled == first and counters["sample_requests"] > sampled


def test_only_an_evaluation_this_code_would_repeat_counts_as_finished(tmp_path, service_client):
    target = evaluate.EvalTarget("base", TINY)
    out = tmp_path / "eval"
    prompts = [EvalPrompt("p1", "Name a colour.", 0.1), EvalPrompt("p2", "Invent a word.", 0.9)]
    evaluate.sample_and_score(service_client, target, prompts, CONFIG, None, out, progress=False)
    assert evaluate.finished_evaluation(out, target, CONFIG) is not None
    # other settings, another checkpoint or label, or a prompting instruction: not this evaluation
    assert evaluate.finished_evaluation(out, target, CONFIG.model_copy(update={"seed": 1})) is None
    assert evaluate.finished_evaluation(out, evaluate.EvalTarget("base", TINY, "tinker://x/y"), CONFIG) is None
    assert evaluate.finished_evaluation(out, evaluate.EvalTarget("other", TINY), CONFIG) is None
    assert evaluate.finished_evaluation(out, evaluate.EvalTarget("base", TINY, instruction="Be creative."),
                                        CONFIG) is None
    # written by other code
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "code": "0" * 64}))
    assert evaluate.finished_evaluation(out, target, CONFIG) is None
    # incomplete or unreadable
    (out / "summary.json").write_text(json.dumps(summary))
    assert evaluate.finished_evaluation(out, target, CONFIG) is not None
    (out / "summary.json").write_text("{not json")
    assert evaluate.finished_evaluation(out, target, CONFIG) is None
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "scores.parquet").unlink()
    assert evaluate.finished_evaluation(out, target, CONFIG) is None
