"""`python scripts/train_dpo.py model_name=Qwen/Qwen3-8B dataset=1 [learning_rate=1e-5 dpo_beta=0.1 ...]`.

The seed guide's command, kept under its name: the same flow and key=value CLI as `flows/train.py` (the
dpo-train flow: validate, train, register). See `flows/train.py` for every key; e.g. the guide's first run:

    .venv/bin/python scripts/train_dpo.py model_name=Qwen/Qwen3-8B dataset=1 batch_size=8 wandb_project=cs329x-dpo
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
if __name__ == "__main__":  # answered before Prefect is imported
    from flows.cli import answer_help

    answer_help("train", sys.argv[1:], program="scripts/train_dpo.py")

from flows.train import main  # noqa: E402  (flows.train sets up the process before Prefect is imported)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
