"""`dry_run=true`: what a run or a suite will do and how many tokens it will move, before anything is paid for.

Counts come from the run's own renderer on the actual data, through the functions training uses (pair subset,
held-out split, batch order, max_steps), so "tokens to train" is the sum of the `num_tokens` its metrics.jsonl will
log. Evaluation's counts are upper bounds: every sample is counted at max_tokens. Nothing here creates a client.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo_core import data, rendering
from dpo_core.config import EvalConfig, TrainConfig, run_name
from dpo_core.settings import Settings


def experiment_plan(config: TrainConfig, settings: Settings) -> dict[str, Any]:
    """One experiment's steps and tokens: trained (forward+backward), reference and held-out (forward only)."""
    from dpo_core.experiment import validate_dataset
    from dpo_core.train import batch_indices, planned_steps, render_pairs

    dataset = validate_dataset(config.dataset, settings)
    renderer_name = config.renderer_name or rendering.renderer_name_for(config.model_name, settings.local_models)
    renderer = rendering.get_renderer(config.model_name, renderer_name)
    pairs = data.pair_subset(data.load_pairs(Path(dataset.path)), config.max_pairs, config.seed)
    rendered = render_pairs(pairs, renderer, config.max_length, dataset.path)
    train_rows, held_rows = data.held_out_split(pairs, config.held_out_fraction, config.held_out_min_pairs,
                                                config.seed)
    steps = planned_steps(config, len(train_rows))
    train_tokens = sum(rendered[train_rows[i]].num_tokens for step in range(steps)
                       for i in batch_indices(config, len(train_rows), step))
    held_tokens = sum(rendered[i].num_tokens for i in held_rows)
    saves = {s for s in range(1, steps + 1) if s == steps or (config.save_every and s % config.save_every == 0)}
    evals = {s for s in range(1, steps + 1) if s == steps or s % config.eval_every == 0} if config.eval_every else saves
    return {"name": run_name(config), "model_name": config.model_name, "dataset": str(config.dataset),
            "loss_type": config.loss_type, "pairs": len(pairs), "trained_pairs": len(train_rows),
            "held_out_pairs": len(held_rows), "steps": steps, "checkpoints": len(saves),
            "train_tokens": train_tokens,
            # Once per (model, dataset, renderer, max_length): cached and shared by every run of a sweep.
            "reference_tokens": sum(p.num_tokens for p in rendered),
            "held_out_tokens": held_tokens * len(evals) if held_rows else 0}


def evaluation_plan(model_name: str, eval_config: EvalConfig, settings: Settings,
                    renderer_name: str | None = None) -> dict[str, Any]:
    """Upper bounds of one evaluated model's tokens: prompts prefilled and answers sampled (at max_tokens each),
    and each answer scored once per quality score (its prompt + answer prefilled)."""
    from dpo_core.evaluate import select_prompts
    from dpo_core.experiment import eval_prompts_path

    renderer = rendering.get_renderer(model_name, renderer_name)
    prompts = select_prompts(data.load_eval_prompts(eval_prompts_path(eval_config, settings)), eval_config)
    prompt_tokens = sum(renderer.build_generation_prompt([{"role": "user", "content": p.prompt}]).length
                        for p in prompts)
    k, max_tokens = eval_config.num_samples, eval_config.max_tokens
    scores = int(eval_config.quality) + int(eval_config.quality_judge)
    return {"prompts": len(prompts), "samples": len(prompts) * k, "prefill_tokens": prompt_tokens,
            "sample_tokens": len(prompts) * k * max_tokens,
            "score_tokens": scores * (prompt_tokens * k + len(prompts) * k * max_tokens)}


def cost(model_name: str, tokens: dict[str, int], prices: dict[str, dict[str, float]]) -> float | None:
    """USD for `tokens` ({"train", "prefill", "sample"} -> count) at the model's price per million tokens; None when
    the price table does not list the model."""
    table = prices.get(model_name)
    if table is None:
        return None
    return sum(count * float(table.get(kind, 0.0)) / 1e6 for kind, count in tokens.items())


def format_plan(experiments: Sequence[TrainConfig], eval_config: EvalConfig | None, settings: Settings) -> str:
    """The dry run's printout: one line per experiment, one per evaluated model, the totals and the cost."""
    rendering.register_models(settings.cache_dir, settings.local_models)
    lines = [f"Dry run ({settings.resolved_backend()} backend): nothing is trained, sampled or paid for.", "",
             "Training (tokens counted with each run's renderer on its data):"]
    costs: list[float | None] = []
    references: dict[tuple, int] = {}
    for config in experiments:
        plan = experiment_plan(config, settings)
        references[(config.model_name, plan["dataset"], config.renderer_name, config.max_length, config.max_pairs,
                    config.seed)] = plan["reference_tokens"]
        lines.append(f"  {plan['name']}: {config.model_name} on {plan['dataset']}, loss {plan['loss_type']}: "
                     f"{plan['steps']} steps on {plan['trained_pairs']} pairs ({plan['held_out_pairs']} held out), "
                     f"{plan['checkpoints']} checkpoint{'s' if plan['checkpoints'] != 1 else ''}; {plan['train_tokens']:,} tokens to train, "
                     f"{plan['held_out_tokens']:,} held-out forward")
        costs.append(cost(config.model_name, {"train": plan["train_tokens"], "prefill": plan["held_out_tokens"]},
                          settings.price_table))
    for (model, dataset, *_), tokens in references.items():
        lines.append(f"  reference logprobs of {model} on {dataset}: {tokens:,} tokens forward "
                     "(once; cached for later runs)")
        costs.append(cost(model, {"prefill": tokens}, settings.price_table))
    if eval_config is not None and experiments:
        lines += ["", f"Evaluation (upper bounds: every answer at max_tokens={eval_config.max_tokens}; "
                      f"k={eval_config.num_samples}):"]
        evaluated = [(f"trained {run_name(c)}", c.model_name, c.renderer_name) for c in experiments]
        evaluated += [(f"base {m}", m, None) for m in dict.fromkeys(c.model_name for c in experiments)]
        for label, model, renderer_name in evaluated:
            plan = evaluation_plan(model, eval_config, settings, renderer_name)
            lines.append(f"  {label}: {plan['prompts']} prompts x {eval_config.num_samples} samples; "
                         f"{plan['prefill_tokens']:,} prompt tokens, <= {plan['sample_tokens']:,} sampled, "
                         f"<= {plan['score_tokens']:,} scored")
            costs.append(cost(model, {"prefill": plan["prefill_tokens"] * eval_config.num_samples
                                      + plan["score_tokens"], "sample": plan["sample_tokens"]}, settings.price_table))
    lines.append("")
    if not settings.price_table:
        lines.append("Cost: no price table configured (DPO_PRICE_TABLE, docs/training-options.md).")
    elif any(c is None for c in costs):
        missing = sorted({c.model_name for c in experiments if c.model_name not in settings.price_table})
        lines.append(f"Cost: the price table lists no price for {', '.join(missing)}; known part "
                     f"{_usd(sum(c for c in costs if c is not None))}.")
    else:
        lines.append(f"Cost estimate: {_usd(sum(costs))} (DPO_PRICE_TABLE, USD per million tokens).")
    return "\n".join(lines)


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"
