"""Complete a few prompts with a trained experiment's final checkpoint and with its base model, and score each
completion's fluency under the base model (its mean token logprob, as the evaluation does).

    python examples/inference_example.py experiments/dataset1_smollm2135m_lr1e-05_beta0.1_2026-11-29
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_core.backend import service_client  # noqa: E402
from dpo_core.checkpoints import final_sampler_path  # noqa: E402
from dpo_core.records import RunConfig  # noqa: E402
from dpo_core.sampling import Sampler  # noqa: E402
from dpo_core.settings import Settings  # noqa: E402

PROMPTS = ["Write a short poem about a paper boat.", "Describe the moon in two sentences."]


def main(run_dir: str) -> None:
    run = RunConfig.read(run_dir)
    model_name, renderer_name = run.train_config.model_name, run.renderer_name  # prompt as training rendered
    model_path = final_sampler_path(run_dir)  # the `sampler_path` of the `final` row in checkpoints.jsonl
    with service_client(Settings()) as client:
        trained = Sampler(model_name, model_path, temperature=0.7, max_tokens=128, seed=0,
                          renderer_name=renderer_name, service_client=client)
        base = Sampler(model_name, None, temperature=0.7, max_tokens=128, seed=0, renderer_name=renderer_name,
                       service_client=client)
        for prompt in PROMPTS:
            [[after]], [[before]] = trained.sample_many([prompt]), base.sample_many([prompt])
            fluency_after, fluency_before = base.mean_logprobs([after, before])
            print(f"### {prompt}\n[trained, fluency {fluency_after:.2f}] {after.text}\n"
                  f"[base, fluency {fluency_before:.2f}] {before.text}\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
