"""`python flows/train.py model_name=... dataset=1 [learning_rate=1e-5 dpo_beta=0.1 batch_size=256 ...]`.

The Prefect flow `dpo-train`: validate the dataset, train one DPO experiment, register its final checkpoint.
Example (the seed guide's first run, on a model Tinker still serves; also `scripts/train_dpo.py ...`):

    .venv/bin/python flows/train.py model_name=Qwen/Qwen3-8B dataset=1 batch_size=8 wandb_project=cs329x-dpo

With no TINKER_API_KEY it runs on the local server, e.g.
    .venv/bin/python flows/train.py model_name=HuggingFaceTB/SmolLM2-135M-Instruct dataset=1 batch_size=8
`--help` lists every key (dpo_core/config_docs.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
if __name__ == "__main__":  # answered before Prefect is imported (~3 s)
    from flows.cli import answer_help

    answer_help("train", sys.argv[1:])

from flows.bootstrap import with_shared_backend  # noqa: E402  (before Prefect is imported)

from prefect import flow  # noqa: E402

from dpo_core.config import TrainConfig, check_step_count  # noqa: E402
from dpo_core.dry_run import format_plan  # noqa: E402
from dpo_core.experiment import validate_dataset as validated  # noqa: E402
from dpo_core.records import TrainOutcome  # noqa: E402
from dpo_core.settings import Settings, install_signal_handlers  # noqa: E402
from flows.cli import exit_code, parse_config, preflight, quiet_user_tracebacks, take_debug_flag  # noqa: E402
from tasks.caching import run_fresh_if_gone, still_there  # noqa: E402
from tasks.train import register_checkpoint, train_experiment  # noqa: E402
from tasks.validate import validate_dataset  # noqa: E402


# The result is persisted (JSON) so that a suite that dispatched this run to a work pool reads it back.
@flow(name="dpo-train", log_prints=True, persist_result=True, result_serializer="json")
@with_shared_backend
def dpo_train(config: TrainConfig) -> TrainOutcome:
    # --- validate: a hard gate, before any Tinker call ---
    dataset = validate_dataset(config.dataset)
    # --- train: resumes an unfinished run with the same config ---
    outcome = run_fresh_if_gone(train_experiment, still_there("run_dir", "checkpoints.jsonl"), config, dataset)
    # --- register: the final checkpoint's tinker:// paths ---
    final = register_checkpoint(outcome.run_dir)
    print(f"Experiment {outcome.run_dir}: "
          f"{'already finished' if outcome.already_finished else f'finished {outcome.steps} steps'}")
    print(f"  checkpoints: {Path(outcome.run_dir) / 'checkpoints.jsonl'}")
    print(f"  sampler_path (use this for inference): {final.sampler_path}")
    return outcome.model_copy(update={"final": final})


def check_before_training(config: TrainConfig) -> None:
    """The flow's own gates, run before it starts so that a user error is one line, not a failed flow run: the
    dataset validates, and the plan makes enough optimizer steps."""
    dataset = validated(config.dataset, Settings())
    check_step_count(config, dataset.rows, Path(dataset.path).name)


def main(argv: list[str]) -> int:
    install_signal_handlers()
    config = parse_config(TrainConfig, take_debug_flag(argv))
    if config is None or not preflight(lambda: check_before_training(config)):
        return 1
    if config.dry_run:  # the plan, before any client exists
        return 0 if preflight(lambda: print(format_plan([config], None, Settings()))) else 1
    quiet_user_tracebacks()
    return exit_code(dpo_train(config, return_state=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
