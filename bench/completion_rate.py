"""How many of the base model's eval samples end on their own, by max_tokens (what sets eval_max_tokens).

    python bench/completion_rate.py                 # SmolLM2-135M, the local suite's 24 prompts x k=4, 256 tokens
    python bench/completion_rate.py --json out.json

One sampling run at the largest cap: a sample that stops within the first N tokens of it is exactly the sample a
run capped at N would have stopped (same seed, token by token), so one run gives the rate at every cap.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_core.settings import Settings, apply_offline_env  # noqa: E402

CAPS = (32, 64, 128, 192, 256)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from dpo_core import data, evaluate, experiment
    from dpo_core.backend import service_client
    from dpo_core.config import EvalConfig
    from dpo_core.sampling import Sampler

    apply_offline_env()
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-completion-"))
    settings = Settings(local_storage=work / "storage", experiments_dir=work / "experiments")
    config = EvalConfig(num_samples=args.k, max_prompts=args.prompts, max_tokens=max(CAPS))
    prompts = evaluate.select_prompts(data.load_eval_prompts(experiment.eval_prompts_path(config, settings)), config)
    start = time.monotonic()
    with service_client(settings) as service:
        sampler = Sampler(args.model, temperature=config.temperature, max_tokens=config.max_tokens,
                          seed=config.seed, service_client=service)
        pools = sampler.sample_many([p.prompt for p in prompts], config.num_samples)
        sampler.close()
    completions = [c for pool in pools for c in pool]
    ended = np.array([c.stop_reason != "length" for c in completions])
    lengths = np.array([len(c.tokens) for c in completions])
    result = {"model": args.model, "samples": len(completions), "wall_s": round(time.monotonic() - start, 1),
              "ended_on_their_own_by": {str(cap): float(np.mean(ended & (lengths <= cap))) for cap in CAPS},
              "median_tokens_of_ended": float(np.median(lengths[ended])) if ended.any() else None}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
