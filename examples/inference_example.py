"""Complete a few prompts with a trained experiment's final checkpoint (and with its base model, to compare).

    python examples/inference_example.py experiments/dataset1_smollm2135m_lr1e-05_beta0.1_2026-11-29
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_core.checkpoints import final_sampler_path  # noqa: E402
from dpo_core.sampling import Sampler  # noqa: E402

PROMPTS = ["Write a short poem about a paper boat.", "Describe the moon in two sentences."]


def main(run_dir: str) -> None:
    config = json.loads((Path(run_dir) / "config.json").read_text())["train_config"]
    model_path = final_sampler_path(run_dir)  # the `sampler_path` of the `final` row in checkpoints.jsonl
    with Sampler(model_name=config["model_name"], model_path=model_path, temperature=0.7, max_tokens=128,
                 seed=0) as sampler:
        for prompt in PROMPTS:
            print(f"### {prompt}\n{sampler.complete(prompt)}\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
