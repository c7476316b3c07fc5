"""`python -m dpo_core validate PATH_OR_NUMBER [--max-length N] [--model NAME]`: check a preference dataset.

Prints the validation report and exits 0 when the dataset is usable; prints the one-line error
(file, row, column, fix) and exits 1 otherwise. No traceback for user errors.
"""

from __future__ import annotations

import argparse
import sys

from dpo_core.config import LOCAL_DEFAULT_MODEL
from dpo_core.data import DatasetError, DatasetNotFoundError, resolve_dataset
from dpo_core.dataset_checks import validate
from dpo_core.settings import Settings, apply_offline_env


def _tokenize_pair_fn(model_name: str, settings: Settings):
    """Render pairs exactly as training will, so truncation counts are the trainer's."""
    from dpo_core import rendering

    rendering.register_models(settings.cache_dir, settings.local_models)
    renderer = rendering.get_renderer(model_name)

    def tokenize_pair(pair):
        chosen, weights = rendering.render_pair_tokens(renderer, pair.prompt, pair.chosen)
        rejected, _ = rendering.render_pair_tokens(renderer, pair.prompt, pair.rejected)
        prompt_len = next((i for i, w in enumerate(weights) if w > 0), len(weights))
        return chosen, rejected, prompt_len

    return tokenize_pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_core", description="dpo-suite library commands")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="validate a preference dataset (1, 2, 3 or a path)")
    check.add_argument("dataset", help="dataset number (1, 2, 3: looked up in the data folder) or a file/folder path")
    check.add_argument("--max-length", type=int, default=None,
                       help="also count tokens and truncation at this length (renders with --model's template)")
    check.add_argument("--model", default=LOCAL_DEFAULT_MODEL, help="model whose tokenizer/renderer to use")
    args = parser.parse_args(argv)
    settings = Settings()
    apply_offline_env(settings)
    try:
        path = resolve_dataset(args.dataset, settings.data_dir)
        tokenize = _tokenize_pair_fn(args.model, settings) if args.max_length else None
        _, report = validate(path, max_length=args.max_length, tokenize_pair=tokenize)
    except (DatasetError, DatasetNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
