"""The key reference, generated from the pydantic models: every entry point's `--help` and docs/configuration.md.

One source for both: a key's type, default (per backend where the suite's defaults depend on it) and meaning are
read from the models themselves (the meaning is the field's description: an attribute docstring or
`Field(description=...)`), so the help, the docs and the code cannot drift apart.

    .venv/bin/python -m dpo_core.config_docs            # rewrite docs/configuration.md (also: make docs)
    .venv/bin/python -m dpo_core.config_docs --check    # exit 1 when docs/configuration.md is out of date
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

DOC_PATH = Path("docs") / "configuration.md"
REGENERATE = ".venv/bin/python -m dpo_core.config_docs"
BACKENDS = ("local", "tinker")


# ----------------------------------------------------------------------------------------------
# One key: its type, default(s) and meaning, as text
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyDoc:
    """A documented key of an entry point (or a setting): `defaults` maps a backend (or "" for all) to a value."""

    name: str
    type: str
    defaults: dict[str, str]
    description: str
    required: bool = False

    def default_text(self) -> str:
        if self.required:
            return "required"
        if set(self.defaults) == {""}:
            return self.defaults[""]
        return ", ".join(f"{backend} {value}" for backend, value in self.defaults.items())


def show_value(value: Any) -> str:
    """A value as a user would type it on the command line: `none`, `true`, `1e-05`, `1,2,3`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(show_value(v) for v in value) if value else "(empty)"
    if isinstance(value, dict):
        return "{}" if not value else "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, SecretStr):
        return "(secret)"
    if value == "":
        return '""'
    return str(value)


_CONSTRAINTS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _constraint_text(metadata: Iterable[Any]) -> str:
    parts = []
    for item in metadata:
        for attribute, symbol in _CONSTRAINTS:
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(f"{symbol} {show_value(bound)}")
    return ", ".join(parts)


def describe_type(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    """`float | None` with `ge=0` -> "float >= 0, or none"; `Literal["a", "b"]` -> "{a, b}"; `list[int]` ->
    "list of int"."""
    metadata = list(metadata)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return describe_type(args[0], [*args[1:], *metadata])
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        text = " or ".join(describe_type(m) for m in members)
        constraints = _constraint_text(metadata)
        text = f"{text} {constraints}" if constraints else text
        return f"{text}, or none" if len(members) < len(args) else text
    constraints = _constraint_text(metadata)
    if origin is Literal:
        text = "{" + ", ".join(show_value(a) for a in args) + "}"
    elif origin in (list, tuple, set, frozenset):
        inner = [describe_type(a) for a in args if a is not Ellipsis]
        text = (f"list of {inner[0]}" if origin is not tuple else f"pair of {inner[0]}" if len(set(inner)) == 1
                else "tuple of " + ", ".join(inner))
    elif origin is dict:
        text = f"JSON object {{{describe_type(args[0])}: {describe_type(args[1])}}}"
    elif annotation is Path:
        text = "path"
    elif annotation is SecretStr:
        text = "secret"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    return f"{text} {constraints}" if constraints else text


def _field_default(info: FieldInfo) -> str:
    factory = info.default_factory
    if factory is not None:
        summary = (factory.__doc__ or "").strip().splitlines()
        # A documented factory (e.g. a folder under $XDG_CACHE_HOME) says what it computes: the value here would
        # be this machine's, and the generated docs must be the same on every machine.
        return summary[0] if summary and factory.__name__ != "<lambda>" else show_value(factory())
    return show_value(info.default)


def key_docs(model: type[BaseModel], backend_defaults: dict[str, dict[str, Any]] | None = None) -> list[KeyDoc]:
    """Every field of `model`, in declaration order; `backend_defaults` (name -> backend -> value) replaces a
    field's own default where it depends on the backend."""
    docs = []
    for name, info in model.model_fields.items():
        if name in (backend_defaults or {}):
            defaults = {backend: show_value(value) for backend, value in backend_defaults[name].items()}
        else:
            defaults = {"": _field_default(info)}
        docs.append(KeyDoc(name, describe_type(info.annotation, info.metadata), defaults,
                           " ".join((info.description or "").split()), info.is_required()))
    return docs


# ----------------------------------------------------------------------------------------------
# The entry points and the settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryPoint:
    """A key=value command: its usage line, what it does, and where its keys come from."""

    command: str
    usage: str
    summary: str
    keys: Callable[[], list[KeyDoc]]
    aliases: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def _train_keys() -> list[KeyDoc]:
    from dpo_core.config import TrainConfig

    return key_docs(TrainConfig)


def suite_backend_defaults() -> dict[str, dict[str, Any]]:
    """The suite's keys whose default depends on the backend: name -> {"local": value, "tinker": value}."""
    from dpo_core.plan import LOCAL_DEFAULTS, TINKER_DEFAULTS, SuiteConfig, max_parallel_for

    per_backend = {name: {"local": LOCAL_DEFAULTS[name], "tinker": TINKER_DEFAULTS[name]}
                   for name in LOCAL_DEFAULTS.keys() & TINKER_DEFAULTS.keys() if name in SuiteConfig.model_fields}
    per_backend["max_parallel"] = {backend: max_parallel_for(SuiteConfig(), backend) for backend in BACKENDS}
    # One value where both backends agree (num_epochs): the table then shows it once.
    return {name: ({"": values["local"]} if values["local"] == values["tinker"] else values)
            for name, values in per_backend.items()}


def _suite_keys() -> list[KeyDoc]:
    from dpo_core.plan import SuiteConfig

    return key_docs(SuiteConfig, suite_backend_defaults())


def _evaluate_keys() -> list[KeyDoc]:
    from dpo_core.config import EvalConfig

    out = KeyDoc("out", "path", {"": "reports/latest"}, "Folder the comparison report (report.md, plots) is "
                 "written to.")
    return [*key_docs(EvalConfig), out]


def _pairs_keys() -> list[KeyDoc]:
    from dpo_core.pairs import PairsConfig

    return key_docs(PairsConfig)


def presets_text() -> list[str]:
    """`preset=NAME` and the keys each one sets (keys given explicitly still win)."""
    from dpo_core.plan import PRESETS

    return [f"{name}: " + (" ".join(f"{k}={show_value(v)}" for k, v in values.items()) or "the backend's defaults")
            for name, values in PRESETS.items()]


ENTRY_POINTS: dict[str, EntryPoint] = {
    "train": EntryPoint(
        "flows/train.py", "model_name=NAME dataset=1|2|3|PATH [KEY=VALUE ...]",
        "One DPO experiment, the Prefect flow `dpo-train`: validate the dataset, train a LoRA adapter with DPO, "
        "register its final checkpoint (the run folder's checkpoints.jsonl has its sampler_path).",
        _train_keys, aliases=("scripts/train_dpo.py",),
        notes=("Without TINKER_API_KEY it runs on the local server (models: local/tiny, "
               "HuggingFaceTB/SmolLM2-135M-Instruct, and DPO_LOCAL_MODELS).",
               "A plan of fewer than 10 optimizer steps is refused: on the shipped 140-pair datasets pass a "
               "batch_size (e.g. batch_size=8), or allow_few_steps=true.")),
    "suite": EntryPoint(
        "flows/suite.py", "[KEY=VALUE ...]",
        "The whole study, the Prefect flow `dpo-suite`: datasets x models x learning_rate x dpo_beta; validate, "
        "train, register, evaluate output diversity against the base models, write the comparison report.",
        _suite_keys,
        notes=("List keys (datasets, models, learning_rate, dpo_beta) take comma-separated values: one experiment "
               "per combination.",
               "Defaults marked local/tinker depend on the backend: tinker when TINKER_API_KEY is set, else local.")),
    "evaluate": EntryPoint(
        "flows/evaluate.py", "experiments/RUN [experiments/RUN ...] [KEY=VALUE ...]",
        "The Prefect flow `dpo-evaluate`: sample and score each experiment's final checkpoint and its base model "
        "on the eval prompts, then write the comparison report.",
        _evaluate_keys),
    "pairs": EntryPoint(
        "flows/pairs.py", "prompts=PATH [KEY=VALUE ...]",
        "The Prefect flow `dpo-pairs`: sample candidates per prompt from a base model, score them, and write the "
        "three preference datasets (embedding diversity, quality, LLM-judge diversity).",
        _pairs_keys),
}


@dataclass(frozen=True)
class SettingDoc:
    """A process setting: the environment variables that set it, its type, default and meaning."""

    variables: tuple[str, ...]
    type: str
    default: str
    description: str


def setting_docs(prefix: str = "") -> list[SettingDoc]:
    """Every field of `Settings` (env prefix DPO_), or those whose name starts with `prefix` (e.g. "local_")."""
    from pydantic import AliasChoices

    from dpo_core.settings import Settings

    docs = []
    for name, info in Settings.model_fields.items():
        if not name.startswith(prefix):
            continue
        alias = info.validation_alias
        variables = (tuple(str(c) for c in alias.choices) if isinstance(alias, AliasChoices)
                     else (str(alias),) if alias else ("DPO_" + name.upper(),))
        docs.append(SettingDoc(variables, describe_type(info.annotation, info.metadata), _field_default(info),
                               " ".join((info.description or "").split())))
    return docs


def undocumented() -> list[str]:
    """Every key and setting without a description, as `<model>.<field>` (the docs test fails on any)."""
    from dpo_core.config import EvalConfig, TrainConfig
    from dpo_core.pairs import PairsConfig
    from dpo_core.plan import SuiteConfig
    from dpo_core.settings import Settings

    return [f"{model.__name__}.{name}" for model in (TrainConfig, SuiteConfig, EvalConfig, PairsConfig, Settings)
            for name, info in model.model_fields.items() if not (info.description or "").strip()]


# ----------------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------------

_WIDTH = 100
_INDENT = " " * 6


def help_text(entry: str, program: str | None = None) -> str:
    """The `--help` of a key=value entry point ("train", "suite", "evaluate", "pairs")."""
    point = ENTRY_POINTS[entry]
    lines = [f"usage: .venv/bin/python {program or point.command} {point.usage}", ""]
    lines += textwrap.wrap(point.summary, _WIDTH)
    lines += ["", "keys (KEY=VALUE; `KEY=none` unsets an optional key; true/false for booleans):"]
    for key in point.keys():
        lines += textwrap.wrap(f"{key.name:<20} {key.type}; "
                               + ("required" if key.required else f"default {key.default_text()}"),
                               _WIDTH, initial_indent="  ", subsequent_indent=_INDENT)
        lines += textwrap.wrap(key.description or "(undocumented)", _WIDTH, initial_indent=_INDENT,
                               subsequent_indent=_INDENT)
    if entry == "suite":
        lines += ["", "presets (preset=NAME; keys given explicitly still win):"]
        lines += [f"  {line}" for line in presets_text()]
    for note in point.notes:
        lines += ["", *textwrap.wrap(note, _WIDTH)]
    lines += [""] + textwrap.wrap(
        "Environment: TINKER_API_KEY selects Tinker; DPO_* variables (or a .env file) set the backend, the data, "
        "experiments and cache folders and the local server: every key and setting is in docs/configuration.md. "
        "--debug (or DPO_DEBUG=1) shows the Python traceback of an error.", _WIDTH)
    return "\n".join(lines)


def settings_help(prefix: str = "") -> str:
    """The settings (optionally only those starting with `prefix`) for an argparse epilog."""
    lines = []
    for setting in setting_docs(prefix):
        lines += textwrap.wrap(f"{' or '.join(setting.variables)}  {setting.type}; default {setting.default}", _WIDTH,
                               initial_indent="  ", subsequent_indent=_INDENT)
        lines += textwrap.wrap(setting.description or "(undocumented)", _WIDTH, initial_indent=_INDENT,
                               subsequent_indent=_INDENT)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# docs/configuration.md
# ----------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def markdown() -> str:
    """The whole of docs/configuration.md."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}` (or `make docs`) from the pydantic models in dpo_core/config.py,",
        "     dpo_core/plan.py, dpo_core/pairs.py and dpo_core/settings.py. Do not edit by hand:",
        "     tests/unit/test_config_docs.py fails when this file is out of date. -->",
        "",
        "Every entry point takes `key=value` arguments (`key=none` unsets an optional key; `true`/`false` for",
        "booleans) and answers `--help` with the same keys. Run them with the project's interpreter,",
        "`.venv/bin/python` (created by `make install`). An unknown key or a bad value stops the command with one",
        "`error:` line before anything runs; `--debug` (or `DPO_DEBUG=1`) adds the Python traceback.",
        "",
        "Contents: [train](#flowstrainpy) · [suite](#flowssuitepy) · [evaluate](#flowsevaluatepy) · "
        "[pairs](#flowspairspy) · [settings (DPO_*)](#settings-environment-variables)",
    ]
    for entry, point in ENTRY_POINTS.items():
        names = " and ".join(f"`{c}`" for c in (point.command, *point.aliases))
        out += ["", f"## {point.command}", "", f"{point.summary} Command: {names}.", "",
                f"    .venv/bin/python {point.command} {point.usage}", ""]
        keys = point.keys()
        per_backend = any(set(k.defaults) != {""} for k in keys)
        if per_backend:
            out += ["| key | type | default (local) | default (tinker) | meaning |", "|---|---|---|---|---|"]
        else:
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key in keys:
            if key.required:
                defaults = ["required"] * (2 if per_backend else 1)
            elif per_backend:
                defaults = [_code(key.defaults.get(b, key.defaults.get(""))) for b in BACKENDS]
            else:
                defaults = [_code(key.defaults[""])]
            out.append("| " + " | ".join([f"`{key.name}`", _cell(key.type), *map(_cell, defaults),
                                           _cell(key.description)]) + " |")
        if entry == "suite":
            out += ["", "Presets (`preset=NAME`, laid over the backend's defaults; keys given explicitly still win):",
                    ""]
            out += [f"- `{line.split(':', 1)[0]}`:{line.split(':', 1)[1]}" for line in presets_text()]
        if point.notes:
            out.append("")
            out += [f"- {note}" for note in point.notes]
    out += ["", "## Settings (environment variables)", "",
            "Process settings, read from the environment or a `.env` file in the working folder (pydantic-settings,",
            "prefix `DPO_`). They are never written to a run's config.json; secrets never reach files or logs.", "",
            "| variable | type | default | meaning |", "|---|---|---|---|"]
    for setting in setting_docs():
        out.append("| " + " | ".join([" or ".join(f"`{v}`" for v in setting.variables), _cell(setting.type),
                                       _code(setting.default), _cell(setting.description)]) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_core.config_docs",
                                     description=f"Write {DOC_PATH} from the pydantic models.")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when {DOC_PATH} is out of date")
    parser.add_argument("--out", type=Path, default=DOC_PATH, help=f"where to write (default {DOC_PATH})")
    args = parser.parse_args(argv)
    text = markdown()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"error: {args.out} is out of date; regenerate it with `{REGENERATE}` (or `make docs`)",
                  file=sys.stderr)
            return 1
        return 0
    from dpo_core.fsutil import atomic_write_bytes

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, text.encode())
    missing = undocumented()
    if missing:
        print(f"warning: keys without a description: {', '.join(missing)}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
