"""The suite's evaluation vs the engine's batched sampling, side by side, with a profile of where the time goes.

    python bench/suite_eval.py                # SmolLM2-135M, 4 models x 24 prompts x k=4 x 64 tokens (the suite's)
    python bench/suite_eval.py --smoke        # local/tiny, seconds: keeps the script from rotting

Same server, models, prompts, k, max_tokens, temperature, seed and threads in both arms, alternating over rounds:
- sampling: what `bench/sampling.py` measures, for every model: all requests in flight at once, `stop=[]` so
  every sample runs to max_tokens (tokens = models x prompts x k x max_tokens);
- suite evaluation: `dpo_core.experiment.evaluate_model` for the base model and each checkpoint, run concurrently
  in 4 threads as the flow's task runner does (sampling, the base model's fluency scoring, embeddings,
  metrics, the three files). Its tokens/s counts the same nominal tokens, as the issue measured it (samples
  that stop early make it generate fewer).
The checkpoints are LoRA sampler checkpoints of an untrained adapter: each is its own merged model and sampler
on the server, as a trained one would be, at the same cost. The profile sums each phase's time over the
evaluation threads and lists the server's batches (rows they started with, of which fluency-scoring rows, and
seconds; requests that joined a running batch are not counted). `--suite-only` skips the sampling arm (what
`bench/versus.py` compares between two checkouts); `--json PATH` writes the figures there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# DPO_BENCH_TREE: another checkout's code (bench/versus.py runs the same script against two trees)
sys.path.insert(0, os.environ.get("DPO_BENCH_TREE") or str(ROOT))

from dpo_core.settings import Settings, apply_offline_env  # noqa: E402


class Profile:
    """Seconds and calls per phase, summed over threads; and the server's batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.batches: list[tuple[int, int, float]] = []  # (rows, scoring rows, seconds)
        self._lock = threading.Lock()

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[label] += time.perf_counter() - started
                    self.calls[label] += 1

        setattr(owner, name, timed)

    def wrap_engine(self, engine: object) -> None:
        # the server's entry: a continuous batch (sample_stream) since issue 27, one batch per call before
        name = "sample_stream" if hasattr(engine, "sample_stream") else "sample_batch"
        original = getattr(engine, name)

        def timed(source, requests, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(source, requests, *args, **kwargs)
            finally:
                scoring = sum(r.num_samples for r in requests if r.prompt_logprobs or r.topk_prompt_logprobs)
                with self._lock:
                    self.batches.append((sum(r.num_samples for r in requests), scoring,
                                         time.perf_counter() - started))

        setattr(engine, name, timed)

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()
            self.batches.clear()


def run(model: str, num_models: int, prompts: int, k: int, max_tokens: int, rounds: int = 1,
        workers: int = 4, sampling_arm_on: bool = True) -> dict:
    """Both arms, alternating over `rounds`; returns the medians, each round, and the last suite round's profile."""
    import tinker

    from dpo_core import data, diversity, evaluate, experiment, rendering, sampling
    from dpo_core.backend import Backend, service_client
    from dpo_core.config import EvalConfig

    apply_offline_env()
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-suite-eval-"))
    settings = Settings(local_storage=work / "storage", experiments_dir=work / "experiments")
    eval_config = EvalConfig(num_samples=k, max_prompts=prompts, max_tokens=max_tokens, temperature=1.0, seed=0)
    chosen = evaluate.select_prompts(
        data.load_eval_prompts(experiment.eval_prompts_path(eval_config, settings)), eval_config)
    profile = Profile()
    for owner, name, label in [(sampling.Sampler, "__init__", "sampling client"),
                               (sampling.Sampler, "sample_many", "sampling"),
                               (sampling.Sampler, "mean_logprobs", "fluency scoring"),
                               (diversity.Embedder, "__init__", "embedder load"),
                               (diversity.Embedder, "encode", "embedding"),
                               (diversity, "score_samples", "text metrics")]:
        profile.wrap(owner, name, label)
    experiment.prepare_concurrent_evaluation()  # imports, as the first evaluation of a process does

    with Backend() as backend, service_client(settings) as service:
        profile.wrap_engine(backend.local_server(settings).engine)
        trainer = service.create_lora_training_client(base_model=model, rank=8).result()
        paths = [trainer.save_weights_for_sampler(f"bench-{i}").result().path for i in range(num_models - 1)]
        renderer = rendering.get_renderer(model)
        inputs = [renderer.build_generation_prompt([{"role": "user", "content": p.prompt}]) for p in chosen]
        clients = [service.create_sampling_client(base_model=model).result()]
        clients += [service.create_sampling_client(model_path=path).result() for path in paths]
        for client in clients:  # load the model and merge each checkpoint before any clock starts
            client.sample(inputs[0], 1, tinker.SamplingParams(max_tokens=2, seed=0)).result()
        params = tinker.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0, stop=[])

        def sampling_arm() -> float:
            started = time.perf_counter()
            futures = [client.sample(model_input, k, params) for client in clients for model_input in inputs]
            for future in futures:
                future.result()
            return time.perf_counter() - started

        def suite_arm(round_index: int) -> tuple[float, int]:
            folder = work / f"round{round_index}"
            round_settings = settings.model_copy(update={"experiments_dir": folder / "experiments"})
            requests = [experiment.EvalRequest(label="base", model_name=model)]
            requests += [experiment.EvalRequest(label=f"checkpoint-{i}", model_name=model, model_path=path,
                                                run_dir=str(folder / f"run-{i}")) for i, path in enumerate(paths)]
            profile.reset()
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=workers) as pool:
                eval_dirs = list(pool.map(
                    lambda r: experiment.evaluate_model(r, eval_config, round_settings), requests))
            wall = time.perf_counter() - started
            generated = sum(json.loads(line)["num_tokens"] for d in eval_dirs
                            for line in (Path(d) / "samples.jsonl").read_text().splitlines())
            return wall, generated

        sampling_s, suite_s, generated = [], [], 0
        for round_index in range(rounds):
            sampling_s.append(sampling_arm() if sampling_arm_on else float("nan"))
            wall, generated = suite_arm(round_index)
            suite_s.append(wall)
    tokens = num_models * len(inputs) * k * max_tokens
    sampling_median, suite_median = statistics.median(sampling_s), statistics.median(suite_s)
    return {"tokens": tokens, "generated_tokens": generated, "prompts": len(inputs),
            "sampling_s": sampling_median, "suite_s": suite_median,
            "sampling_rounds": sampling_s, "suite_rounds": suite_s,
            "sampling_tok_s": tokens / sampling_median, "suite_tok_s": tokens / suite_median,
            "ratio": suite_median / sampling_median,
            "profile": dict(profile.seconds), "calls": dict(profile.calls), "batches": list(profile.batches)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="local/tiny, 2 models x 3 prompts x k=2 x 4 tokens")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--models", type=int, default=4, help="the base model + (models - 1) checkpoints")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--suite-only", action="store_true", help="skip the sampling arm")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.models, args.prompts, args.k, args.max_tokens = "local/tiny", 2, 3, 2, 4
    result = run(args.model, args.models, args.prompts, args.k, args.max_tokens, args.rounds,
                 sampling_arm_on=not args.suite_only)
    if args.json:
        args.json.write_text(json.dumps(result))
    print(f"model {args.model}: {args.models} models x {result['prompts']} prompts x k={args.k} x "
          f"{args.max_tokens} tokens = {result['tokens']} tokens, {args.rounds} round(s), arms alternating")
    print(f"  sampling (all in flight, stop=[]): {result['sampling_s']:.2f} s ({result['sampling_tok_s']:.1f} tok/s; "
          f"runs {[round(s, 1) for s in result['sampling_rounds']]})")
    print(f"  suite evaluation (4 threads): {result['suite_s']:.2f} s ({result['suite_tok_s']:.1f} tok/s; "
          f"runs {[round(s, 1) for s in result['suite_rounds']]}; {result['generated_tokens']} tokens generated)")
    print(f"  ratio suite evaluation / sampling wall: {result['ratio']:.2f}x (target <= 1.5x)")
    print("  profile of the last suite round (seconds summed over threads, calls):")
    for label, seconds in sorted(result["profile"].items(), key=lambda item: -item[1]):
        print(f"    {label}: {seconds:.1f} s ({result['calls'][label]} calls)")
    batches = result["batches"]
    print(f"  server batches: {len(batches)}, {sum(b[2] for b in batches):.1f} s; rows (scoring rows, s): "
          + ", ".join(f"{rows} ({scoring}, {seconds:.1f})" for rows, scoring, seconds in batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
