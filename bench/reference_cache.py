"""A 3-value β sweep on one dataset: dpo-suite (reference logprobs computed once, cached) vs three runs of
tinker-cookbook's unmodified `preference.train_dpo.main`, both against the same local server.

    python bench/reference_cache.py             # SmolLM2-135M, 16 pairs of dataset 2, batch 8, β 0.05/0.1/0.5
    python bench/reference_cache.py --smoke     # local/tiny, 4 pairs, batch 2: seconds, keeps the script alive

Same server process, model, pairs, renderer, max_length, batch, LoRA rank, lr and threads; the arms alternate
over --repeats rounds. Reference tokens are counted by the server (prompt tokens of the base-model logprob
requests); wall time covers the three runs, model already loaded. Targets: reference tokens <= 0.4x and wall
<= 0.7x of the cookbook's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import chz  # noqa: E402
import datasets  # noqa: E402
import tinker  # noqa: E402
from tinker_cookbook.preference import train_dpo  # noqa: E402
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons  # noqa: E402
from tinker_cookbook.preference.preference_datasets import ComparisonDatasetBuilder  # noqa: E402
from tinker_cookbook.preference.types import Comparison, LabeledComparison  # noqa: E402
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig  # noqa: E402

from dpo_core import data, rendering  # noqa: E402
from dpo_core.config import TrainConfig  # noqa: E402
from dpo_core.local.launcher import local_server  # noqa: E402
from dpo_core.settings import Settings, apply_offline_env  # noqa: E402
from dpo_core.train import train  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
BETAS = (0.05, 0.1, 0.5)
_PAIRS: list[data.PreferencePair] = []  # the cookbook builder reads the benchmark's pairs from here


@chz.chz
class BenchComparisons(ComparisonDatasetBuilder):
    """The benchmark's pairs as cookbook comparisons (chosen = completion A)."""

    def get_train_and_test_datasets(self):
        return datasets.Dataset.from_list([{"index": i} for i in range(len(_PAIRS))]), None

    def example_to_labeled_comparison(self, example):
        pair = _PAIRS[example["index"]]
        return LabeledComparison(comparison=Comparison(
            prompt_conversation=[dict(m) for m in pair.prompt],
            completion_A=[dict(m) for m in pair.chosen], completion_B=[dict(m) for m in pair.rejected],
        ), label="A")


def sweep_suite(service: tinker.ServiceClient, model: str, batch: int, max_length: int, work: Path) -> list[float]:
    """The three runs; returns each run's wall time (the first one also computes the reference)."""
    walls = []
    for beta in BETAS:
        config = TrainConfig(model_name=model, dataset="2", learning_rate=1e-5, dpo_beta=beta, batch_size=batch,
                             num_epochs=1, lora_rank=32, max_length=max_length, seed=0)
        started = time.perf_counter()
        train(config, service, _PAIRS, run_dir=work / f"suite-beta{beta}", dataset_path="bench",
              dataset_hash=work.name, reference_dir=work / "reference")
        walls.append(time.perf_counter() - started)
    return walls


def sweep_cookbook(server, model: str, batch: int, max_length: int, work: Path) -> None:
    renderer = rendering.renderer_name_for(model)
    for beta in BETAS:
        train_dpo.main(train_dpo.Config(
            log_path=str(work / f"cookbook-beta{beta}"), model_name=model, renderer_name=renderer,
            recipe_name="dpo-suite-bench",
            dataset_builder=DPODatasetBuilderFromComparisons(
                comparison_builder=BenchComparisons(),
                common_config=ChatDatasetBuilderCommonConfig(
                    model_name_for_tokenizer=model, renderer_name=renderer, max_length=max_length, batch_size=batch),
            ),
            learning_rate=1e-5, dpo_beta=beta, lora_rank=32, num_epochs=1, base_url=server.base_url,
            save_every=0, eval_every=0, infrequent_eval_every=0,
        ))


def run(model: str, pairs: int, batch: int, max_length: int, repeats: int) -> dict:
    apply_offline_env()
    settings = Settings()
    rendering.register_models(settings.cache_dir, settings.local_models)
    _PAIRS[:] = data.load_pairs(ROOT / "data" / data.DATASET_FILES[2])[:pairs]
    results: dict[str, list[tuple[float, int]]] = {"dpo-suite": [], "cookbook": []}
    reference_share = []  # the first run's extra time (its reference pass) over a run without one
    with tempfile.TemporaryDirectory() as tmp, local_server(settings, storage=Path(tmp) / "storage") as server:
        os.environ["TINKER_API_KEY"] = server.api_key  # the cookbook builds its own ServiceClient from the env
        with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as service:
            service.create_sampling_client(base_model=model).result().compute_logprobs(
                tinker.ModelInput.from_ints([1, 2, 3])).result()  # load the model before any clock starts
            counters = server.engine.counters
            for round_ in range(repeats):
                order = ["dpo-suite", "cookbook"] if round_ % 2 == 0 else ["cookbook", "dpo-suite"]
                for arm in order:
                    work = Path(tmp) / f"{arm}-{round_}"  # a fresh reference cache each round: the sweep starts cold
                    work.mkdir()
                    tokens_before = counters["prompt_logprob_tokens"]
                    started = time.perf_counter()
                    if arm == "dpo-suite":
                        walls = sweep_suite(service, model, batch, max_length, work)
                        reference_share.append((walls[0] - statistics.mean(walls[1:])) / statistics.mean(walls[1:]))
                    else:
                        sweep_cookbook(server, model, batch, max_length, work)
                    reference_tokens = counters["prompt_logprob_tokens"] - tokens_before
                    results[arm].append((time.perf_counter() - started, reference_tokens))
    summary = {arm: {"wall_s": statistics.median(w for w, _ in runs), "reference_tokens": runs[0][1],
                     "runs_wall_s": [round(w, 1) for w, _ in runs]} for arm, runs in results.items()}
    summary["tokens_ratio"] = summary["dpo-suite"]["reference_tokens"] / summary["cookbook"]["reference_tokens"]
    summary["wall_ratios"] = [round(s[0] / c[0], 2) for s, c in zip(results["dpo-suite"], results["cookbook"])]
    summary["wall_ratio"] = statistics.median(s[0] / c[0] for s, c in zip(results["dpo-suite"], results["cookbook"]))
    # Profile: with the reference pass costing r x a run without it, caching it can at best give
    # (3 + r) / (3 (1 + r)); the rest of each run (forward + backward + optimizer step) is the same work in both.
    r = statistics.median(reference_share)
    summary["reference_cost"] = r
    summary["best_wall_ratio"] = (3 + r) / (3 * (1 + r))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="local/tiny, 4 pairs, batch 2, max_length 64, 1 round")
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.pairs, args.batch, args.max_length, args.repeats = "local/tiny", 4, 2, 64, 1
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore", FutureWarning)  # the cookbook still calls the SDK's deprecated *_async names
    result = run(args.model, args.pairs, args.batch, args.max_length, args.repeats)
    suite, cookbook = result["dpo-suite"], result["cookbook"]
    print(f"model {args.model}: beta sweep {list(BETAS)} on {args.pairs} pairs of dataset 2, batch {args.batch}, "
          f"max_length {args.max_length}, {args.repeats} round(s), arms alternating")
    print(f"  dpo-suite (reference cached): {suite['reference_tokens']} reference tokens, "
          f"{suite['wall_s']:.1f} s (runs {suite['runs_wall_s']})")
    print(f"  tinker-cookbook train_dpo.main x3: {cookbook['reference_tokens']} reference tokens, "
          f"{cookbook['wall_s']:.1f} s (runs {cookbook['runs_wall_s']})")
    print(f"  ratio reference tokens: {result['tokens_ratio']:.2f}x (target <= 0.4); "
          f"wall: {result['wall_ratio']:.2f}x (per round {result['wall_ratios']}; target <= 0.7)")
    print(f"  profile: one reference pass costs {result['reference_cost']:.2f}x a training run without it, so "
          f"caching it can at best reach a wall ratio of {result['best_wall_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
