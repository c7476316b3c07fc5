"""`python flows/pairs.py prompts=PATH [model_name=... num_candidates=8 rho=0.5 judge_model=... out_dir=data]`.

The Prefect flow `dpo-pairs`: sample a pool of candidates per prompt from a base model, score them (quality,
embedding diversity, LLM-judge originality), and write the three preference datasets with provenance columns.
Regenerating the shipped sample datasets (see data/README.md):

    .venv/bin/python flows/pairs.py prompts=data/train_prompts.parquet model_name=HuggingFaceTB/SmolLM2-135M-Instruct

`--help` lists every key (dpo_core/config_docs.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
if __name__ == "__main__":  # answered before Prefect is imported
    from flows.cli import answer_help

    answer_help("pairs", sys.argv[1:])

from flows.bootstrap import with_shared_backend  # noqa: E402  (before Prefect is imported)

from prefect import flow  # noqa: E402

from dpo_core.pairs import PairsConfig, load_prompts  # noqa: E402
from dpo_core.settings import install_signal_handlers  # noqa: E402
from flows.artifacts import publish_pairs  # noqa: E402
from flows.cli import exit_code, parse_config, preflight, quiet_user_tracebacks, take_debug_flag  # noqa: E402
from tasks.pairs import build_pairs  # noqa: E402


@flow(name="dpo-pairs", log_prints=True)
@with_shared_backend
def dpo_pairs(config: PairsConfig) -> dict:
    # --- sample, score, select: per-prompt stages are cached, so new prompts only cost their own sampling ---
    summary = build_pairs(config)
    # --- report: yield per criterion and the gap distributions ---
    publish_pairs(summary, config.out_dir)
    return summary


def main(argv: list[str]) -> int:
    install_signal_handlers()
    config = parse_config(PairsConfig, take_debug_flag(argv))
    if config is None or not preflight(lambda: load_prompts(Path(config.prompts))):  # a bad prompts file: one line
        return 1
    quiet_user_tracebacks()
    return exit_code(dpo_pairs(config, return_state=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
