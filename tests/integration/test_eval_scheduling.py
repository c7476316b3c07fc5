"""How the evaluation issues its requests (issue 16): the base model's fluency comes from its own sampled
logprobs (no scoring pass), and those equal what the scoring pass computes; checkpoints are still scored by
the base model."""

from __future__ import annotations

import json

import numpy as np

from dpo_core.config import EvalConfig
from dpo_core.data import EvalPrompt
from dpo_core.evaluate import EvalTarget, sample_and_score
from dpo_core.sampling import Sampler

TINY = "local/tiny"
PROMPTS = [EvalPrompt("p1", "Name a colour.", 0.1), EvalPrompt("p2", "Invent a word and define it.", 0.9)]


def test_sampled_logprobs_at_temperature_one_are_the_base_models_fluency(service_client):
    sampler = Sampler(TINY, temperature=1.0, max_tokens=8, seed=3, service_client=service_client)
    assert sampler.samples_are_model_logprobs()
    pools = sampler.sample_many([p.prompt for p in PROMPTS], num_samples=3)
    completions = [c for pool in pools for c in pool if c.tokens]
    assert completions and all(len(c.logprobs) == len(c.tokens) for c in completions)
    scored = Sampler(TINY, service_client=service_client).mean_logprobs(completions)
    assert np.allclose([np.mean(c.logprobs) for c in completions], scored, atol=1e-3)
    assert not Sampler(TINY, temperature=0.7, service_client=service_client).samples_are_model_logprobs()


def test_base_model_evaluation_sends_no_scoring_request_and_a_checkpoints_does(service_client, server, tmp_path):
    # quality_judge off: its rubric requests are counted elsewhere; fluency scoring is what is under test
    config = EvalConfig(num_samples=2, max_tokens=6, temperature=1.0, seed=0, bootstrap=100, quality_judge=False)
    counters = server.engine.counters
    before = counters["prompt_logprob_requests"]
    base = sample_and_score(service_client, EvalTarget("base", TINY), PROMPTS, config, None, tmp_path / "base",
                            progress=False)
    assert counters["prompt_logprob_requests"] == before
    assert np.isfinite(base["overall"]["quality_logprob"]["mean"])
    samples = [json.loads(line) for line in (tmp_path / "base" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("quality_logprob" in s for s in samples)

    trainer = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    path = trainer.save_weights_for_sampler("eval-scheduling").result().path
    sample_and_score(service_client, EvalTarget("checkpoint", TINY, path), PROMPTS, config, None,
                     tmp_path / "checkpoint", progress=False)
    scored = [json.loads(line) for line in (tmp_path / "checkpoint" / "samples.jsonl").read_text().splitlines()]
    assert counters["prompt_logprob_requests"] - before == sum(1 for s in scored if s["num_tokens"])
