"""Run by tests/tinker_path with a user's tinker environment: `python check_one_renderer.py RUN_DIR`.

Prints one JSON line: the run's renderer, whether the training prompt prefix equals the evaluation prompt token
for token, the decoded end of the evaluation prompt, and texts sampled from the final checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dpo_core import data, rendering
from dpo_core.records import RunConfig
from dpo_core.sampling import Sampler

run_dir = sys.argv[1]
run = RunConfig.read(run_dir)
model_name = run.train_config.model_name
pair = data.load_pairs(Path(run.dataset_path))[0]
# Training: the chosen conversation as the run renders it; the prompt is every token before the first weighted one.
renderer = rendering.get_renderer(model_name, run.renderer_name)
tokens, weights = rendering.render_pair_tokens(renderer, list(pair.prompt), list(pair.chosen))
train_prefix = tokens[:next(i for i, w in enumerate(weights) if w > 0)]
# Inference: the Sampler of the run (its renderer from config.json), as the example builds it.
with Sampler.from_run(run_dir, temperature=1.0, max_tokens=24, seed=0) as sampler:
    eval_prompt = sampler._prompt(list(pair.prompt)).to_ints()
    samples = sampler.sample_many([list(pair.prompt)], num_samples=2)[0]
    print(json.dumps({
        "renderer_name": run.renderer_name,
        "prefix_equal": train_prefix == eval_prompt,
        "eval_prompt_end": rendering.get_tokenizer(model_name).decode(eval_prompt[-8:]),
        "sample_texts": [c.text for c in samples],
        "sample_raw": [rendering.get_tokenizer(model_name).decode(c.tokens) for c in samples],
    }))
