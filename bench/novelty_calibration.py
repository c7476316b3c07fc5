"""Calibrate the quality-aware metrics' two thresholds on the shipped data (dpo_core.novelty).

    python bench/novelty_calibration.py            # SmolLM2-135M on the local server, ~2 min on 2 CPUs
    python bench/novelty_calibration.py --json out.json

Fluency floor: the shipped candidates (every untruncated chosen/rejected text of datasets 1-3: real samples of
the base model at temperature 1, their `*_quality` = mean token logprob under it) against two kinds of noise of
the same lengths, scored by the same model for the same prompts: word salad (each text's words shuffled) and
random tokens (uniform over the tokenizer's vocabulary). The floor should keep nearly all real samples and
almost no noise.

Similarity threshold: MiniLM cosine similarity between two different candidates of the same prompt (chosen vs
rejected; the pairs are selected to differ) and between texts of different prompts; a threshold above nearly
all of both only merges near-restatements into one NoveltyBench class.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_core.settings import Settings, apply_offline_env  # noqa: E402

FLOORS = (-3.5, -4.0, -4.5, -5.0, -5.5)
THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=int, default=96, help="texts per noise kind")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import pandas as pd

    from dpo_core.backend import service_client
    from dpo_core.diversity import Embedder
    from dpo_core.models import SMOLLM2
    from dpo_core.sampling import Completion, Sampler

    frames = [pd.read_parquet(ROOT / "data" / f) for f in ("dataset1_embedding_diversity.parquet",
                                                           "dataset2_quality_based.parquet",
                                                           "dataset3_llm_judge_diversity.parquet")]
    texts: dict[tuple[str, str], float] = {}
    for frame in frames:
        for row in frame.itertuples():
            texts[(row.prompt, row.chosen)] = row.chosen_quality
            texts[(row.prompt, row.rejected)] = row.rejected_quality
    real = np.array(list(texts.values()), dtype=float)

    apply_offline_env()
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-novelty-"))
    settings = Settings(local_storage=work / "storage", experiments_dir=work / "experiments")
    rng = random.Random(0)
    picked = rng.sample(sorted(texts), min(args.noise, len(texts)))
    with service_client(settings) as service:
        sampler = Sampler(SMOLLM2, service_client=service)
        tokenizer = sampler.renderer.tokenizer
        vocabulary = tokenizer.vocab_size
        salad, noise = [], []
        for prompt, text in picked:
            prompt_tokens = sampler._prompt(prompt).to_ints()
            words = text.split()
            rng.shuffle(words)
            salad.append(Completion(" ".join(words), tokenizer.encode(" ".join(words), add_special_tokens=False),
                                    prompt_tokens))
            length = len(tokenizer.encode(text, add_special_tokens=False))
            noise.append(Completion("", [rng.randrange(vocabulary) for _ in range(length)], prompt_tokens))
        salad_scores = np.array(sampler.mean_logprobs(salad))
        noise_scores = np.array(sampler.mean_logprobs(noise))
        sampler.close()

    embedder = Embedder()
    by_prompt = [(row.chosen, row.rejected) for frame in frames for row in frame.itertuples()]
    chosen = embedder.encode([c for c, _ in by_prompt])
    rejected = embedder.encode([r for _, r in by_prompt])
    same_prompt = np.sum(chosen * rejected, axis=1)
    other_prompt = np.sum(chosen * np.roll(rejected, 1, axis=0), axis=1)

    result = {
        "real_texts": int(real.size), "noise_texts": len(picked),
        "mean_logprob": {name: {"p05": float(np.percentile(v, 5)), "median": float(np.median(v)),
                                "p95": float(np.percentile(v, 95))}
                         for name, v in (("real", real), ("word_salad", salad_scores), ("random_tokens", noise_scores))},
        "share_at_or_above_floor": {str(f): {"real": float(np.mean(real >= f)),
                                             "word_salad": float(np.mean(salad_scores >= f)),
                                             "random_tokens": float(np.mean(noise_scores >= f))} for f in FLOORS},
        "similarity": {name: {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
                              "p99": float(np.percentile(v, 99))}
                       for name, v in (("same_prompt_chosen_vs_rejected", same_prompt),
                                       ("different_prompts", other_prompt))},
        "share_same_class": {str(t): {"same_prompt": float(np.mean(same_prompt >= t)),
                                      "different_prompts": float(np.mean(other_prompt >= t))} for t in THRESHOLDS},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
