"""What the study found: paired comparisons of trained models, the Findings section, its plot (pure functions).

Each trained model is compared prompt by prompt with its base model and with the dataset-2 (quality) model of
the same base model and hyper-parameters: the quality dataset is the control for "DPO happened at all", so a
diversity dataset only counts as making a model more diverse if it beats both. Inputs are the per-prompt score
frames of `scores.parquet` (one row per prompt: `prompt_id`, `creativity_score`, metric columns), keyed by model
label, and optionally each model's samples (`samples.jsonl` rows) for the length-controlled metrics.

Every row of `paired_table` is one (comparison, metric, scope) test: the mean per-prompt difference
`model - reference`, its paired bootstrap 95% CI and a sign-flip permutation p-value, Holm-adjusted within each
comparison and family (diversity / length-controlled / context), over the metrics x scopes reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpo_core import stats
from dpo_core.diversity import HIGHER_IS_MORE_DIVERSE
from dpo_core.length_control import TEXT_METRICS, SampleRows, length_controlled_name, length_controlled_scores
from dpo_core.length_control import raw_metric_name

OVERALL = "all"
DEFAULT_BUCKET_EDGES = (1 / 3, 2 / 3)  # creativity: low < 1/3 <= mid < 2/3 <= high
DEFAULT_BUCKET_NAMES = ("low", "mid", "high")
DIVERSITY_METRICS = ("embedding_distance", "vendi", "distinct_1", "distinct_2", "self_bleu", "compression_ratio")
# quality_judge: the base model's quality-rubric rating (independent of every dataset's selection signal);
# quality_logprob: its mean token logprob, which is dataset 2's selection signal (circular for dataset 2).
CONTEXT_METRICS = ("quality_judge", "quality_logprob", "mean_words", "mean_tokens")
CIRCULAR_NOTE = {"quality_logprob": "fluency (quality_logprob: dataset 2's own selection signal)"}
FAMILY_DIVERSITY, FAMILY_LENGTH_CONTROLLED, FAMILY_CONTEXT = "diversity", "length-controlled", "context"
VERSUS_BASE = "base"
QUALITY_DATASET = "2"


@dataclass(frozen=True)
class Comparison:
    """Model `model` against `reference`; `versus` names the reference's role ("base", "dataset 2")."""

    model: str
    reference: str
    versus: str
    dataset: str | None = None


def plan_comparisons(entries: Sequence[Any], quality_dataset: str = QUALITY_DATASET,
                     hyperparameters: Sequence[str] = ("learning_rate", "dpo_beta")) -> list[Comparison]:
    """Each trained entry vs its base model and vs the quality-dataset entry with the same model and hyper-params.

    Entries need `label`, `model_name`, `dataset` (None for a base model) and the hyper-parameter attributes,
    as `report.ReportEntry` has.
    """
    def setting(entry: Any) -> tuple:
        return (entry.model_name, *(getattr(entry, name, None) for name in hyperparameters))

    bases = {entry.model_name: entry for entry in entries if entry.dataset in (None, "", "base")}
    quality = {setting(entry): entry for entry in entries if str(entry.dataset) == str(quality_dataset)}
    comparisons = []
    for entry in entries:
        if entry.dataset in (None, "", "base"):
            continue
        dataset = str(entry.dataset)
        if entry.model_name in bases:
            comparisons.append(Comparison(entry.label, bases[entry.model_name].label, VERSUS_BASE, dataset))
        partner = quality.get(setting(entry))
        if partner is not None and partner.label != entry.label:
            comparisons.append(Comparison(entry.label, partner.label, f"dataset {quality_dataset}", dataset))
    return comparisons


def assign_buckets(creativity: Sequence[float] | np.ndarray, edges: Sequence[float] = DEFAULT_BUCKET_EDGES,
                   names: Sequence[str] = DEFAULT_BUCKET_NAMES) -> np.ndarray:
    """Bucket name per creativity score: names[i] holds edges[i-1] <= score < edges[i]."""
    if len(names) != len(edges) + 1:
        raise ValueError(f"{len(edges)} bucket edges need {len(edges) + 1} bucket names, got {list(names)}")
    return np.asarray(names, dtype=object)[np.searchsorted(np.asarray(edges), np.asarray(creativity), side="right")]


def paired_table(scores: Mapping[str, pd.DataFrame], comparisons: Sequence[Comparison],
                 metrics: Sequence[str] = DIVERSITY_METRICS, context_metrics: Sequence[str] = CONTEXT_METRICS,
                 samples: Mapping[str, SampleRows] | None = None,
                 bucket_edges: Sequence[float] = DEFAULT_BUCKET_EDGES,
                 bucket_names: Sequence[str] = DEFAULT_BUCKET_NAMES,
                 bootstrap_rounds: int = stats.DEFAULT_BOOTSTRAP_ROUNDS,
                 permutation_rounds: int = stats.DEFAULT_PERMUTATION_ROUNDS, seed: int = 0,
                 alpha: float = 0.05) -> pd.DataFrame:
    """One row per comparison x metric x scope (overall, then each bucket): paired difference, CI, p, Holm p."""
    rows = []
    for comparison in comparisons:
        model, reference = scores[comparison.model], scores[comparison.reference]
        paired = model.merge(reference, on="prompt_id", suffixes=("@model", "@reference"))
        creativity_column = "creativity_score@model" if "creativity_score@model" in paired else "creativity_score"
        creativity = paired[creativity_column]
        paired["scope_bucket"] = assign_buckets(creativity.to_numpy(dtype=float), bucket_edges, bucket_names)
        families = [(FAMILY_DIVERSITY, metrics), (FAMILY_CONTEXT, context_metrics)]
        if samples is not None:
            controlled = length_controlled_scores(samples, [comparison.model, comparison.reference],
                                                  [m for m in metrics if m in TEXT_METRICS])
            paired = paired.merge(controlled[comparison.model].drop(columns="common_words"), on="prompt_id")
            paired = paired.merge(controlled[comparison.reference].drop(columns="common_words"), on="prompt_id",
                                  suffixes=("@model", "@reference"))
            families.insert(1, (FAMILY_LENGTH_CONTROLLED,
                                [length_controlled_name(m) for m in metrics if m in TEXT_METRICS]))
        for family, family_metrics in families:
            family_rows = []
            for metric in family_metrics:
                if f"{metric}@model" not in paired or f"{metric}@reference" not in paired:
                    continue  # e.g. embedding metrics of an evaluation run without an embedder
                for scope in (OVERALL, *bucket_names):
                    part = paired if scope == OVERALL else paired[paired["scope_bucket"] == scope]
                    if part.empty:
                        continue
                    result = stats.paired_compare(part[f"{metric}@model"].to_numpy(dtype=float),
                                                  part[f"{metric}@reference"].to_numpy(dtype=float),
                                                  bootstrap_rounds, permutation_rounds, seed)
                    family_rows.append({"model": comparison.model, "reference": comparison.reference,
                                        "versus": comparison.versus, "dataset": comparison.dataset,
                                        "family": family, "metric": metric, "scope": scope,
                                        "num_pairs": result.num_pairs, "mean_model": result.mean_model,
                                        "mean_reference": result.mean_reference, "difference": result.difference,
                                        "ci_low": result.ci_low, "ci_high": result.ci_high,
                                        "p_value": result.p_value})
            adjusted = stats.holm([row["p_value"] for row in family_rows])
            for row, p_holm in zip(family_rows, adjusted):
                row["p_holm"] = float(p_holm)
                row["significant"] = bool(p_holm < alpha)  # NaN (nothing to test) compares False
            rows.extend(family_rows)
    columns = ["model", "reference", "versus", "dataset", "family", "metric", "scope", "num_pairs", "mean_model",
               "mean_reference", "difference", "ci_low", "ci_high", "p_value", "p_holm", "significant"]
    return pd.DataFrame(rows, columns=columns)


def _more_diverse(metric: str, difference: float, higher_is_more_diverse: Mapping[str, bool]) -> bool:
    return (difference > 0) == higher_is_more_diverse[raw_metric_name(metric)]


def _effect(row: pd.Series, with_means: bool = False) -> str:
    change = f"{row['difference']:+.3g} [{row['ci_low']:+.3g}, {row['ci_high']:+.3g}], {_p(row['p_holm'])}"
    return f"{row['mean_reference']:.3g} → {row['mean_model']:.3g} ({change})" if with_means else change


def _p(p_value: float) -> str:
    return "p n/a" if pd.isna(p_value) else ("p < 0.001" if p_value < 0.001 else f"p = {p_value:.2g}")


def _moves(rows: pd.DataFrame, higher_is_more_diverse: Mapping[str, bool]) -> list[str]:
    """'more diverse on X (scope effect; ...)' clauses for the significant rows, one per direction."""
    clauses = []
    for more in (True, False):
        chosen = rows[rows.apply(lambda r: _more_diverse(r["metric"], r["difference"], higher_is_more_diverse)
                                 == more, axis=1)] if len(rows) else rows
        if chosen.empty:
            continue
        per_metric = [f"{raw_metric_name(metric)} ({'; '.join(f'{r.scope} {_effect(r)}' for _, r in part.iterrows())})"
                      for metric, part in chosen.groupby("metric", sort=False)]
        clauses.append(("more diverse on " if more else "less diverse on ") + ", ".join(per_metric))
    return clauses


def comparison_sentence(rows: pd.DataFrame, higher_is_more_diverse: Mapping[str, bool] = HIGHER_IS_MORE_DIVERSE,
                        quality_metric: str = "quality_logprob", length_metric: str = "mean_words") -> str:
    """One comparison's finding: diversity moves, what held at equal length, and quality and length alongside."""
    first = rows.iloc[0]
    head = f"**{first['model']}** vs {first['versus']} (`{first['reference']}`, {int(first['num_pairs'])} prompts)"
    diversity = rows[rows["family"] == FAMILY_DIVERSITY]
    significant = diversity[diversity["significant"]]
    parts = _moves(significant, higher_is_more_diverse)
    if parts:
        quiet = [m for m in dict.fromkeys(diversity["metric"]) if m not in set(significant["metric"])]
        if quiet:
            parts.append("no significant change on " + ", ".join(quiet))
    elif not diversity.empty:
        closest = diversity.sort_values("p_value", kind="stable").iloc[0]
        parts.append(f"no diversity metric moved (closest: {closest['metric']} {closest['scope']} {_effect(closest)})")
    controlled = rows[rows["family"] == FAMILY_LENGTH_CONTROLLED]
    if not controlled.empty:
        held = {(raw_metric_name(r.metric), r.scope) for r in controlled.itertuples() if r.significant}
        vanished = [f"{r.metric} {r.scope}" for r in significant.itertuples()
                    if r.metric in TEXT_METRICS and (r.metric, r.scope) not in held]
        if vanished:
            parts.append("at equal length " + ", ".join(vanished) + " no longer moves: a length effect")
        equal = _moves(controlled[controlled["significant"]], higher_is_more_diverse)
        if equal:
            parts.append("at equal length: " + "; ".join(equal))
    context = rows[(rows["family"] == FAMILY_CONTEXT) & (rows["scope"] == OVERALL)].set_index("metric")
    shown = [(length_metric, "length (words)"), (quality_metric, f"quality ({quality_metric})")]
    shown += [(m, note) for m, note in CIRCULAR_NOTE.items() if m != quality_metric]
    for metric, name in shown:
        if metric in context.index:
            parts.append(f"{name} {_effect(context.loc[metric], with_means=True)}")
    return f"{head}: " + "; ".join(parts) + "."


def findings_markdown(table: pd.DataFrame, higher_is_more_diverse: Mapping[str, bool] = HIGHER_IS_MORE_DIVERSE,
                      dataset_names: Mapping[str, str] | None = None, alpha: float = 0.05,
                      quality_metric: str = "quality_logprob", length_metric: str = "mean_words") -> str:
    """The report's **Findings** section: per dataset, one sentence per comparison a reader takes in at a glance."""
    dataset_names = {str(k): v for k, v in (dataset_names or {}).items()}
    shown = [m for m in dict.fromkeys(table.loc[table["family"] == FAMILY_DIVERSITY, "metric"])]
    lines = ["## Findings", "",
             f"Paired over the same prompts and sampling seeds: each number is the mean per-prompt difference "
             f"model − reference [paired bootstrap 95% CI], with a sign-flip permutation p-value Holm-adjusted over "
             f"the metrics × creativity buckets of that comparison; a change counts at p < {alpha:g}. "
             "Higher is more diverse for " + (", ".join(m for m in shown if higher_is_more_diverse[m]) or "none")
             + "; lower for " + (", ".join(m for m in shown if not higher_is_more_diverse[m]) or "none") + ".", ""]
    if table.empty:
        return "\n".join(lines + ["No trained model had a reference to compare with.", ""])
    datasets = table["dataset"].map(lambda value: None if pd.isna(value) else str(value))
    for dataset in sorted(set(datasets), key=lambda value: (value is None, value or "")):
        name = dataset_names.get(dataset)
        heading = f"### Dataset {dataset}" + (f" ({name})" if name else "")
        lines += ["### Other comparisons" if dataset is None else heading, ""]
        part = table[datasets.map(lambda value: value == dataset)]
        for _, rows in part.groupby(["model", "versus"], sort=False):
            lines.append("- " + comparison_sentence(rows, higher_is_more_diverse, quality_metric, length_metric))
        lines.append("")
    return "\n".join(lines)


def positive_control_sentence(table: pd.DataFrame, control_label: str, versus: str = VERSUS_BASE) -> str:
    """One sentence: did the instrument detect any significant diversity change in the control model?"""
    rows = table[(table["model"] == control_label) & (table["versus"] == versus)
                 & (table["family"] == FAMILY_DIVERSITY)]
    if rows.empty:
        return f"Positive control `{control_label}`: no comparison vs {versus} was run, so the instrument is untested."
    found = rows[rows["significant"]].sort_values("p_holm")
    if found.empty:
        return (f"Positive control `{control_label}`: the instrument did NOT detect a diversity change vs {versus} "
                f"(no metric significant after Holm over {len(rows)} tests), so a null finding elsewhere means "
                "'not measurable at this scale', not 'no effect'.")
    best = found.iloc[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return (f"Positive control `{control_label}`: the instrument detected a diversity change vs {versus} "
            f"({best['metric']} {best['scope']} {_effect(best)}{more}).")


def plot_paired_differences(table: pd.DataFrame, path: Path, versus: str = VERSUS_BASE,
                            family: str = FAMILY_DIVERSITY,
                            higher_is_more_diverse: Mapping[str, bool] = HIGHER_IS_MORE_DIVERSE) -> Path:
    """PNG: per metric, each model's paired difference vs `versus` with 95% CI per scope; filled = significant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[(table["versus"] == versus) & (table["family"] == family)]
    metrics = list(dict.fromkeys(rows["metric"])) or ["(none)"]
    scopes = list(dict.fromkeys(rows["scope"]))
    models = list(dict.fromkeys(rows["model"]))
    columns = min(3, len(metrics))
    fig, axes = plt.subplots((len(metrics) + columns - 1) // columns, columns,
                             figsize=(4.4 * columns, 3.4 * ((len(metrics) + columns - 1) // columns)), squeeze=False)
    width = 0.7 / max(len(models), 1)
    for axis, metric in zip(axes.flat, metrics):
        for index, model in enumerate(models):
            series = rows[(rows["metric"] == metric) & (rows["model"] == model)].set_index("scope")
            dataset = series["dataset"].iloc[0] if len(series) else None
            label = f"{model} (dataset {dataset})" if dataset is not None else model
            for position, scope in enumerate(scopes):
                if scope not in series.index:
                    continue
                row = series.loc[scope]
                x = position - 0.35 + width * (index + 0.5)
                axis.errorbar([x], [row["difference"]], fmt="o", color=f"C{index}", capsize=3,
                              yerr=[[row["difference"] - row["ci_low"]], [row["ci_high"] - row["difference"]]],
                              markerfacecolor=f"C{index}" if row["significant"] else "white",
                              label=label if position == 0 else None)
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(scopes)), scopes)
        arrow = "↑" if higher_is_more_diverse.get(raw_metric_name(metric), True) else "↓"
        axis.set_title(f"{metric}: model − {versus} ({arrow} = more diverse)", fontsize=9)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    if models:
        axes.flat[0].legend(fontsize=7, title="filled = significant (Holm)", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
