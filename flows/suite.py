"""`python flows/suite.py`: the whole study (validate, train, register, evaluate, report) as the Prefect flow `dpo-suite`.

Not built yet: the suite flow lands with issue 5 (training flow: issue 4). Until then this entry point says so
and exits non-zero, rather than pretending to run.
"""

from __future__ import annotations

import sys

MESSAGE = (
    "dpo-suite: the suite flow (`dpo-suite`) is not built yet. What works today:\n"
    "  python -m dpo_core validate 1            # check a dataset (1, 2, 3 or a path)\n"
    "  python -m dpo_core.local serve           # the local Tinker-compatible server\n"
    "See README.md, 'Status'."
)


def main() -> int:
    print(MESSAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
