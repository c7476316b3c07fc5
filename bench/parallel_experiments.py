"""Why the suite trains one experiment at a time on the in-process local server: two experiments one after the
other vs both at once (two threads, as `max_parallel=2` runs them), on one in-process server.

    python bench/parallel_experiments.py                 # SmolLM2-135M, dataset 2's first 80 pairs, batch 8, 2 rounds
    python bench/parallel_experiments.py --pairs 24      # the first 24 pairs only (3 steps per experiment)
    python bench/parallel_experiments.py --smoke         # local/tiny, 1 round: keeps the script alive

Arms alternate over rounds (noisy shared vCPUs); each arm trains into a fresh experiments folder. The reference
logprobs are cached by an untimed warm-up run first, so both arms time training steps only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_core.settings import Settings, apply_offline_env  # noqa: E402

apply_offline_env()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=80,
                        help="train on the first N pairs of dataset 2 (80: the size this was measured at)")
    args = parser.parse_args()
    from dpo_core import experiment
    from dpo_core.backend import Backend
    from dpo_core.config import TrainConfig

    model = "local/tiny" if args.smoke else "HuggingFaceTB/SmolLM2-135M-Instruct"
    rounds = args.rounds or (1 if args.smoke else 2)
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-parallel-"))
    # The machine's model cache (converted weights, tokenizers; the warm-up adds this data's reference logprobs).
    base = Settings(data_dir=ROOT / "data", local_storage=work / "storage", backend="local")
    dataset_ref: int | str = 2
    if args.pairs:
        import pandas as pd

        from dpo_core import data

        subset = work / "pairs.parquet"
        pd.read_parquet(data.resolve_dataset(2, ROOT / "data")).head(args.pairs).to_parquet(subset)
        dataset_ref = str(subset)
    configs = [TrainConfig(model_name=model, dataset=dataset_ref, learning_rate=1e-4, dpo_beta=beta, batch_size=8,
                           max_length=128) for beta in (0.05, 0.2)]

    def train_all(folder: Path, parallel: bool) -> float:
        settings = base.model_copy(update={"experiments_dir": folder})
        dataset = experiment.validate_dataset(dataset_ref, settings)
        started = time.perf_counter()
        if parallel:
            with ThreadPoolExecutor(max_workers=len(configs)) as pool:
                list(pool.map(lambda c: experiment.train_experiment(c, settings, dataset), configs))
        else:
            for config in configs:
                experiment.train_experiment(config, settings, dataset)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"sequential": [], "parallel": []}
    with Backend():  # one in-process server for every arm, as a suite run has
        train_all(work / "warm-up", parallel=False)  # models loaded, reference logprobs cached
        for round_ in range(rounds):
            order = ["sequential", "parallel"] if round_ % 2 == 0 else ["parallel", "sequential"]
            for arm in order:
                times[arm].append(train_all(work / f"{arm}-{round_}", parallel=arm == "parallel"))
                print(f"round {round_} {arm}: {times[arm][-1]:.1f} s", flush=True)
    seq, par = (sum(times[a]) / len(times[a]) for a in ("sequential", "parallel"))
    print(f"{model}, 2 experiments on {args.pairs} pairs, batch 8: sequential {seq:.1f} s, parallel {par:.1f} s, "
          f"parallel/sequential {par / seq:.2f}x")


if __name__ == "__main__":
    main()
