"""Complete a few prompts with a trained experiment's final checkpoint and with its base model, and score each
completion's fluency under the base model (its mean token logprob, as the evaluation does).

    .venv/bin/python examples/inference_example.py experiments/dataset1_smollm2135m_lr0.001_beta0.1_2026-12-01

`Sampler.from_run` reads the run folder: the base model and the renderer from config.json (prompts render exactly
as training rendered them), the final checkpoint's `sampler_path` from checkpoints.jsonl. Without TINKER_API_KEY
it samples on the local server over the same checkpoint storage (DPO_LOCAL_STORAGE, default .dpo_local).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_core.backend import service_client  # noqa: E402
from dpo_core.sampling import Sampler  # noqa: E402
from dpo_core.settings import Settings  # noqa: E402

PROMPTS = ["Write a short poem about a paper boat.", "Describe the moon in two sentences."]


def main(run_dir: str) -> None:
    with service_client(Settings()) as client:  # one client (one local server) for both samplers
        trained = Sampler.from_run(run_dir, temperature=0.7, max_tokens=128, seed=0, service_client=client)
        base = Sampler(trained.model_name, None, temperature=0.7, max_tokens=128, seed=0,
                       renderer_name=trained.renderer_name, service_client=client)
        for prompt in PROMPTS:
            [[after]], [[before]] = trained.sample_many([prompt]), base.sample_many([prompt])
            fluency_after, fluency_before = base.mean_logprobs([after, before])
            print(f"### {prompt}\n[trained, fluency {fluency_after:.2f}] {after.text}\n"
                  f"[base, fluency {fluency_before:.2f}] {before.text}\n")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("--help", "-h", "help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:] and sys.argv[1] in ("--help", "-h", "help") else 2)
    main(sys.argv[1])
