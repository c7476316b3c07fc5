"""`python flows/pairs.py prompts=PATH [model_name=... num_candidates=8 rho=0.5 judge_model=... out_dir=data]`.

The Prefect flow `dpo-pairs`: sample a pool of candidates per prompt from a base model, score them (quality,
embedding diversity, LLM-judge originality), and write the three preference datasets with provenance columns.
Regenerating the shipped sample datasets (see data/README.md):

    python flows/pairs.py prompts=data/train_prompts.parquet model_name=HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_core.settings import apply_offline_env, install_signal_handlers  # noqa: E402

apply_offline_env()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from dpo_core.pairs import PairsConfig  # noqa: E402
from dpo_core.report import report_artifact_markdown  # noqa: E402
from flows.cli import exit_code, parse_config  # noqa: E402
from tasks.training import build_pairs  # noqa: E402


@flow(name="dpo-pairs", log_prints=True)
def dpo_pairs(config: PairsConfig) -> dict:
    # --- sample, score, select: per-prompt stages are cached, so new prompts only cost their own sampling ---
    summary = build_pairs(config)
    # --- report: yield per criterion and the gap distributions ---
    rows = [{"dataset": n, **v} for n, v in summary["per_dataset"].items()]
    create_table_artifact(key="dpo-pairs-yield", table=rows, description="Pairs per criterion, drops, mean gaps")
    plot = Path(config.out_dir) / "pairs_gaps.png"
    if plot.exists():
        note = plot.with_suffix(".md")
        note.write_text(f"# dpo-pairs\n\n![gaps]({plot.name})\n")
        create_markdown_artifact(key="dpo-pairs-gaps", markdown=report_artifact_markdown(note))
        note.unlink()
    for row in rows:
        print(f"dataset {row['dataset']} ({row['criterion']}): {row['pairs']} pairs, "
              f"{row['dropped_too_close']} dropped as too close, {row['no_pair']} prompts without a pair")
    print(f"judge parse failures: {summary['judge_failures']}; files: {summary['files']}")
    return summary


def main(argv: list[str]) -> int:
    install_signal_handlers()
    config = parse_config(PairsConfig, argv)
    return 1 if config is None else exit_code(dpo_pairs(config, return_state=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
