"""`python flows/train.py model_name=... dataset=1 [learning_rate=1e-5 dpo_beta=0.1 batch_size=256 ...]`.

The Prefect flow `dpo-train`: validate the dataset, train one DPO experiment, register its final checkpoint.
Example (the seed guide's first run):

    python flows/train.py model_name=Qwen/Qwen3-4B-Instruct-2507 dataset=1 wandb_project=cs329x-dpo

With no TINKER_API_KEY it runs on the local server, e.g.
    python flows/train.py model_name=HuggingFaceTB/SmolLM2-135M-Instruct dataset=1 batch_size=8
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from dpo_core.settings import apply_offline_env, install_signal_handlers  # noqa: E402

apply_offline_env()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow  # noqa: E402

from dpo_core.config import TrainConfig  # noqa: E402
from flows.cli import exit_code, parse_config  # noqa: E402
from tasks.caching import run_fresh_if_gone, still_there  # noqa: E402
from tasks.training import register_checkpoint, train_experiment, validate_dataset  # noqa: E402


@flow(name="dpo-train", log_prints=True)
def dpo_train(config: TrainConfig) -> dict:
    # --- validate: a hard gate, before any Tinker call ---
    dataset = validate_dataset(config.dataset)
    # --- train: resumes an unfinished run with the same config ---
    result = run_fresh_if_gone(train_experiment, still_there("run_dir", "checkpoints.jsonl"), config, dataset)
    # --- register: the final checkpoint's tinker:// paths ---
    final = register_checkpoint(result["run_dir"])
    status = "already finished" if result["already_finished"] else f"finished {result['steps']} steps"
    print(f"Experiment {result['run_dir']}: {status}")
    print(f"  checkpoints: {Path(result['run_dir']) / 'checkpoints.jsonl'}")
    print(f"  sampler_path (use this for inference): {final['sampler_path']}")
    return {**result, "final": final}


def main(argv: list[str]) -> int:
    install_signal_handlers()
    config = parse_config(TrainConfig, argv)
    return 1 if config is None else exit_code(dpo_train(config, return_state=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
