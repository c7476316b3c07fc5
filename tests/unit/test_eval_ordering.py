"""Scoring on a base model waits while this process is still sampling that base model (issue 16: scoring rows
queued beside its sampling requests rode along the server's decode as dead rows)."""

from __future__ import annotations

import threading
import time

from dpo_core import evaluate


def test_scoring_waits_for_the_base_models_sampling_and_only_for_it():
    events: list[str] = []

    def score(model: str) -> None:
        evaluate._wait_for_base_sampling(model)
        events.append(f"scored {model}")

    with evaluate._sampling_base(evaluate.EvalTarget("base", "org/base")):
        waiting = threading.Thread(target=score, args=("org/base",))
        waiting.start()
        score("org/other")  # another model's scoring does not wait
        with evaluate._sampling_base(evaluate.EvalTarget("ckpt", "org/base", "tinker://x")):
            time.sleep(0.2)  # a checkpoint's sampling is not the base model's
        events.append("sampled org/base")
    waiting.join(timeout=10)
    assert events == ["scored org/other", "sampled org/base", "scored org/base"]
