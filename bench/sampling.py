"""Evaluation sampling throughput: all prompts in flight at once (the server batches them) vs one at a time.

    python bench/sampling.py                 # SmolLM2-135M, 16 prompts, k=8, 64 tokens
    python bench/sampling.py --smoke         # local/tiny, seconds: keeps the script from rotting

Both arms run in the same process against the same local server, model, prompts, k, seed and threads; the
printed ratio is batched tokens/s over sequential tokens/s (target >= 5x). `--batched-only` skips the sequential
arm (what `bench/versus.py` compares between two checkouts); `--json PATH` writes the figures there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# DPO_BENCH_TREE: another checkout's code (bench/versus.py runs the same script against two trees)
sys.path.insert(0, os.environ.get("DPO_BENCH_TREE") or str(Path(__file__).resolve().parents[1]))

import tinker  # noqa: E402

from dpo_core import data, rendering  # noqa: E402
from dpo_core.local.launcher import local_server  # noqa: E402
from dpo_core.settings import Settings, apply_offline_env  # noqa: E402


def run(model: str, prompts: int, k: int, max_tokens: int, sequential_arm: bool = True) -> dict[str, float]:
    apply_offline_env()
    settings = Settings()
    rendering.register_models(settings.cache_dir, settings.local_models)
    renderer = rendering.get_renderer(model)
    texts = [p.prompt for p in data.load_eval_prompts(Path(settings.data_dir) / "eval_prompts.parquet")][:prompts]
    inputs = [renderer.build_generation_prompt([{"role": "user", "content": t}]) for t in texts]
    # stop=[]: every sample runs to max_tokens, so both arms generate exactly the same number of tokens.
    params = tinker.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0, stop=[])
    with local_server(settings, storage=Path(settings.local_storage) / "bench") as server:
        with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as service:
            sampler = service.create_sampling_client(base_model=model).result()
            sampler.sample(inputs[0], 1, tinker.SamplingParams(max_tokens=2, seed=0)).result()  # load the model
            started = time.perf_counter()
            for model_input in inputs if sequential_arm else []:
                sampler.sample(model_input, k, params).result()
            sequential = time.perf_counter() - started if sequential_arm else float("nan")
            started = time.perf_counter()
            futures = [sampler.sample(model_input, k, params) for model_input in inputs]
            for future in futures:
                future.result()
            batched = time.perf_counter() - started
    tokens = len(inputs) * k * max_tokens
    return {"tokens": tokens, "sequential_s": sequential, "batched_s": batched,
            "sequential_tok_s": tokens / sequential, "batched_tok_s": tokens / batched,
            "ratio": sequential / batched}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="local/tiny, 4 prompts, 8 tokens")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batched-only", action="store_true", help="skip the one-request-at-a-time arm")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.prompts, args.max_tokens = "local/tiny", 4, 8
    result = run(args.model, args.prompts, args.k, args.max_tokens, sequential_arm=not args.batched_only)
    if args.json:
        args.json.write_text(json.dumps(result))
    print(f"model {args.model}, {args.prompts} prompts x k={args.k} x {args.max_tokens} tokens "
          f"= {result['tokens']} tokens")
    print(f"one request at a time: {result['sequential_s']:.1f} s ({result['sequential_tok_s']:.0f} tok/s)")
    print(f"all in flight (batched): {result['batched_s']:.1f} s ({result['batched_tok_s']:.0f} tok/s)")
    print(f"ratio batched/sequential: {result['ratio']:.2f}x (target >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
