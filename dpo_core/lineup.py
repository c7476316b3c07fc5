"""Tinker's model lineup as data: what it serves today, what it retired, and how to render each model's chats.

The lineup is a dated snapshot, not something fetched: the study must run offline, and a run's config records
the renderer it used, so the mapping must not change under a running suite. Refresh it by hand from the source
below and move `LINEUP_DATE`; `tests/unit/test_standin.py` checks every renderer name against the installed
tinker-cookbook so a stale name fails loudly.

Renderers: each served model carries tinker-cookbook's recommended renderer (`model_info`, tinker-cookbook
0.5.8) and the one this project uses by default. They differ only for hybrid thinking models, which default to
the `_disable_thinking` variant: the study measures answers, not reasoning (shared/DESIGN.md, Chat rendering).
"""

from __future__ import annotations

from dataclasses import dataclass

LINEUP_SOURCE = (
    "tinker-cookbook, skills/research/references/models.md on its main branch "
    "(https://github.com/thinking-machines-lab/tinker-cookbook); renderers from tinker_cookbook.model_info 0.5.8"
)
LINEUP_DATE = "2026-11-29"


@dataclass(frozen=True)
class LineupModel:
    """One base model Tinker serves, as the cookbook lists it."""

    name: str
    kind: str  # "hybrid" (thinking on/off), "base" (pretrained only)
    arch: str  # "dense" | "moe"
    vision: bool
    recommended_renderer: str  # tinker_cookbook.model_info.get_recommended_renderer_name(name)
    default_renderer: str  # what this project renders with unless a run names another

    @property
    def hybrid_thinking(self) -> bool:
        return self.kind == "hybrid"


@dataclass(frozen=True)
class Retirement:
    """A model Tinker no longer serves, and the served model a run should move to."""

    name: str
    successor: str
    why: str


# Qwen family, in the cookbook's order. Qwen3.5 and 3.6 share one tokenizer and chat template (hence one
# renderer family); Qwen3.8 keeps that tokenizer but has its own template with reasoning-effort levels.
TINKER_LINEUP: tuple[LineupModel, ...] = (
    LineupModel("Qwen/Qwen3.8-27B", "hybrid", "dense", True, "qwen3_8_xhigh_reasoning", "qwen3_8_disable_thinking"),
    LineupModel("Qwen/Qwen3.6-35B-A3B", "hybrid", "moe", True, "qwen3_5", "qwen3_5_disable_thinking"),
    LineupModel("Qwen/Qwen3.6-27B", "hybrid", "dense", True, "qwen3_5", "qwen3_5_disable_thinking"),
    LineupModel("Qwen/Qwen3.5-397B-A17B", "hybrid", "moe", True, "qwen3_5", "qwen3_5_disable_thinking"),
    LineupModel("Qwen/Qwen3.5-35B-A3B-Base", "base", "moe", True, "role_colon", "role_colon"),
    LineupModel("Qwen/Qwen3.5-9B", "hybrid", "dense", True, "qwen3_5", "qwen3_5_disable_thinking"),
    LineupModel("Qwen/Qwen3.5-9B-Base", "base", "dense", True, "role_colon", "role_colon"),
    LineupModel("Qwen/Qwen3.5-4B", "hybrid", "dense", True, "qwen3_5", "qwen3_5_disable_thinking"),
    LineupModel("Qwen/Qwen3-8B", "hybrid", "dense", False, "qwen3", "qwen3_disable_thinking"),
)

RETIRED: dict[str, Retirement] = {
    retirement.name: retirement
    for retirement in (
        Retirement(
            "Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3.5-4B",
            "tinker-cookbook's own recipes moved from it to Qwen/Qwen3.5-4B (with qwen3_5_disable_thinking)",
        ),
        Retirement(
            "Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3.6-35B-A3B",
            # The retired model is an instruct (chat, no reasoning) MoE with ~3B active parameters. Among the
            # served models the only chat MoE of that shape is Qwen3.6-35B-A3B (35B total, 3B active);
            # Qwen3.5-35B-A3B-Base has the shape but is a pretrained-only model, and Qwen3.5-397B-A17B is ten
            # times larger. Rendered with thinking disabled it answers without reasoning, as the 2507 did.
            "closest served chat MoE: same ~3B active parameters, a chat model (the -Base twin is not), "
            "rendered with thinking disabled like the non-thinking 2507 instruct",
        ),
    )
}

_BY_NAME = {model.name: model for model in TINKER_LINEUP}


def served_names() -> list[str]:
    """Base model names Tinker serves in this snapshot, in the cookbook's order (its capabilities list)."""
    return [model.name for model in TINKER_LINEUP]


def get(name: str) -> LineupModel:
    """The lineup entry of a served model; a retired or unknown name is a KeyError that says what to use."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    raise KeyError(not_served_message(name))


def successor(name: str) -> str | None:
    """The served model that replaces a retired one, or None when `name` was not retired."""
    retirement = RETIRED.get(name)
    return retirement.successor if retirement else None


def default_renderer(name: str) -> str:
    """The renderer this project uses for a served model (the `_disable_thinking` variant for hybrids)."""
    return get(name).default_renderer


def not_served_message(name: str) -> str:
    """Why Tinker would refuse `name` and what to use instead, as one sentence for an error."""
    retirement = RETIRED.get(name)
    if retirement is not None:
        return (
            f"{name} is retired on Tinker (lineup of {LINEUP_DATE}); use {retirement.successor} instead: "
            f"{retirement.why}"
        )
    return f"{name} is not in Tinker's lineup of {LINEUP_DATE}; it serves: {', '.join(served_names())}"
