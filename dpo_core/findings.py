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
from dpo_core.novelty import QUALITY_AWARE_METRICS

OVERALL = "all"
DEFAULT_BUCKET_EDGES = (1 / 3, 2 / 3)  # creativity: low < 1/3 <= mid < 2/3 <= high
DEFAULT_BUCKET_NAMES = ("low", "mid", "high")
DIVERSITY_METRICS = ("embedding_distance", "vendi", "distinct_1", "distinct_2", "self_bleu", "compression_ratio")
# quality_judge: the base model's quality-rubric rating (independent of every dataset's selection signal);
# quality_logprob: its mean token logprob, which is dataset 2's selection signal (circular for dataset 2).
CONTEXT_METRICS = ("quality_judge", "quality_logprob", "mean_words", "mean_tokens", "completion_rate")
CIRCULAR_NOTE = {"quality_logprob": "fluency (quality_logprob: dataset 2's own selection signal)"}
FAMILY_DIVERSITY, FAMILY_LENGTH_CONTROLLED, FAMILY_CONTEXT = "diversity", "length-controlled", "context"
FAMILY_QUALITY_AWARE = "quality-aware"
# The findings lead with these (dpo_core.novelty): diversity among valid samples only; higher = better.
QUALITY_AWARE = QUALITY_AWARE_METRICS
VERSUS_BASE = "base"
QUALITY_DATASET = "2"


@dataclass(frozen=True)
class Comparison:
    """Model `model` against `reference`; `versus` names the reference's role ("base", "dataset 2").

    With several training seeds, `model_runs` / `reference_runs` list every run's label (seed order) and `model`
    / `reference` name the condition (its first run); empty = the one run `model` / `reference`."""

    model: str
    reference: str
    versus: str
    dataset: str | None = None
    model_runs: tuple[str, ...] = ()
    reference_runs: tuple[str, ...] = ()
    model_name: str | None = None  # the base model both sides share
    # the training settings that tell this condition from others of the same dataset and model ("lr 0.001 ·
    # loss ipo"); empty when the report's runs differ in nothing but dataset, model and seed
    setting: str = ""

    def runs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.model_runs or (self.model,), self.reference_runs or (self.reference,)


# The training settings a suite sweeps (plan.SWEPT), with their short names in a condition's setting.
HYPERPARAMETERS = {"learning_rate": "lr", "dpo_beta": "β", "loss_type": "loss"}


def _trained(entry: Any) -> bool:
    return entry.dataset not in (None, "", "base")


def varying_settings(entries: Sequence[Any], hyperparameters: Sequence[str] = tuple(HYPERPARAMETERS)) -> list[str]:
    """The hyper-parameters whose values differ between the trained entries. None is no value: the prompting
    baseline trains nothing, which is not another setting."""
    return [name for name in hyperparameters
            if len({value for e in entries if _trained(e) and (value := getattr(e, name, None)) is not None}) > 1]


def describe_setting(entry: Any, varying: Sequence[str]) -> str:
    """`entry`'s values of the `varying` settings, e.g. "lr 0.001 · loss ipo" (settings it lacks left out)."""
    values = [(HYPERPARAMETERS.get(name, name), getattr(entry, name, None)) for name in varying]
    return " · ".join(f"{short} {value:g}" if isinstance(value, float) else f"{short} {value}"
                      for short, value in values if value is not None and not pd.isna(value))


def plan_comparisons(entries: Sequence[Any], quality_dataset: str = QUALITY_DATASET,
                     hyperparameters: Sequence[str] = tuple(HYPERPARAMETERS)) -> list[Comparison]:
    """Each trained condition vs its base model and vs the quality-dataset condition with the same model and
    hyper-params. A condition is every run that shares model, dataset and hyper-parameters (its training seeds):
    runs that differ in a hyper-parameter (a loss_type sweep) are separate conditions, never pooled as seeds.

    Entries need `label`, `model_name`, `dataset` (None for a base model) and the hyper-parameter attributes,
    and may have `seed`, as `report.ReportEntry` has.
    """
    def setting(entry: Any) -> tuple:
        return (entry.model_name, *(getattr(entry, name, None) for name in hyperparameters))

    varying = varying_settings(entries, hyperparameters)
    conditions: dict[tuple, list[Any]] = {}
    for entry in entries:
        if _trained(entry):
            conditions.setdefault((str(entry.dataset), *setting(entry)), []).append(entry)
    runs = {key: tuple(e.label for e in sorted(group, key=lambda e: getattr(e, "seed", None) or 0))
            for key, group in conditions.items()}
    settings = {key: describe_setting(group[0], varying) for key, group in conditions.items()}
    bases = {entry.model_name: entry for entry in entries if not _trained(entry)}
    quality = {key[1:]: key for key in conditions if key[0] == str(quality_dataset)}
    comparisons = []
    for key, labels in runs.items():
        dataset, model_name = key[0], key[1]
        several = len(labels) > 1
        if model_name in bases:
            comparisons.append(Comparison(labels[0], bases[model_name].label, VERSUS_BASE, dataset,
                                          labels if several else (), model_name=model_name, setting=settings[key]))
        partner = quality.get(key[1:])
        if partner is not None and partner != key:
            partner_runs = runs[partner]
            comparisons.append(Comparison(labels[0], partner_runs[0], f"dataset {quality_dataset}", dataset,
                                          labels if several else (),
                                          partner_runs if len(partner_runs) > 1 else (), model_name=model_name,
                                          setting=settings[key]))
    return comparisons


def with_setting(name: str, setting: Any) -> str:
    """A condition's name with its setting when it has one: "Dataset 1 (embedding diversity) [loss ipo]"."""
    return f"{name} [{setting}]" if isinstance(setting, str) and setting else name


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
                 alpha: float = 0.05, quality_metrics: Sequence[str] = QUALITY_AWARE) -> pd.DataFrame:
    """One row per comparison x metric x scope (overall, then each bucket): paired difference, CI, p, Holm p.

    With one run per side: the per-prompt differences, their bootstrap CI and sign-flip p (Holm within the
    comparison and family). With several training seeds: the seeds x prompts matrix of differences (seed i of
    the model against seed i of a trained reference, or against the one base run), a two-level bootstrap CI
    (seeds and prompts resampled), `p_value` from the seed-averaged per-prompt differences, `p_seed` from an
    exact permutation test at the seed level and `seed_sd`, the spread of the per-seed mean differences.
    `counts` (the findings' rule) = the CI excludes 0."""
    rows = []
    for comparison in comparisons:
        model_runs, reference_runs = comparison.runs()
        labels = [*model_runs, *reference_runs]
        frames = {label: scores[label].set_index("prompt_id") for label in labels}
        shared = set.intersection(*(set(frame.index) for frame in frames.values()))
        order = [p for p in frames[model_runs[0]].index if p in shared]
        creativity = frames[model_runs[0]].loc[order, "creativity_score"].to_numpy(dtype=float)
        scope_of = pd.Series(assign_buckets(creativity, bucket_edges, bucket_names), index=order)
        families = [(FAMILY_QUALITY_AWARE, quality_metrics), (FAMILY_DIVERSITY, metrics),
                    (FAMILY_CONTEXT, context_metrics)]
        if samples is not None:
            controlled = length_controlled_scores(samples, labels, [m for m in metrics if m in TEXT_METRICS])
            for label in labels:
                extra = controlled[label].drop(columns="common_words").set_index("prompt_id")
                frames[label] = frames[label].join(extra, how="left")
            families.insert(2, (FAMILY_LENGTH_CONTROLLED,
                                [length_controlled_name(m) for m in metrics if m in TEXT_METRICS]))
        for family, family_metrics in families:
            family_rows = []
            for metric in family_metrics:
                if any(metric not in frames[label].columns for label in labels):
                    continue  # e.g. embedding metrics of an evaluation run without an embedder
                model_SP = np.array([frames[r].loc[order, metric].to_numpy(dtype=float) for r in model_runs])
                reference_SP = np.array([frames[r].loc[order, metric].to_numpy(dtype=float) for r in reference_runs])
                for scope in (OVERALL, *bucket_names):
                    columns = np.ones(len(order), bool) if scope == OVERALL else (scope_of == scope).to_numpy()
                    if not columns.any():
                        continue
                    row = _compare(model_SP[:, columns], reference_SP[:, columns], bootstrap_rounds,
                                   permutation_rounds, seed)
                    family_rows.append({"model": comparison.model, "reference": comparison.reference,
                                        "versus": comparison.versus, "dataset": comparison.dataset,
                                        "model_name": comparison.model_name, "setting": comparison.setting,
                                        "family": family, "metric": metric, "scope": scope, **row})
            adjusted = stats.holm([row["p_value"] for row in family_rows])
            for row, p_holm in zip(family_rows, adjusted):
                row["p_holm"] = float(p_holm)
                row["significant"] = bool(p_holm < alpha)  # NaN (nothing to test) compares False
                row["counts"] = bool(row["ci_low"] > 0 or row["ci_high"] < 0)
            rows.extend(family_rows)
    columns = ["model", "reference", "versus", "dataset", "model_name", "setting", "family", "metric", "scope",
               "num_pairs", "num_seeds",
               "mean_model", "mean_reference", "difference", "ci_low", "ci_high", "p_value", "p_seed", "seed_sd",
               "p_holm", "significant", "counts"]
    return pd.DataFrame(rows, columns=columns)


def _compare(model_SP: np.ndarray, reference_SP: np.ndarray, bootstrap_rounds: int, permutation_rounds: int,
             seed: int) -> dict[str, Any]:
    """One paired test of a seeds x prompts block (see paired_table)."""
    num_seeds = model_SP.shape[0]
    if num_seeds == 1 and reference_SP.shape[0] == 1:
        result = stats.paired_compare(model_SP[0], reference_SP[0], bootstrap_rounds, permutation_rounds, seed)
        return {"num_pairs": result.num_pairs, "num_seeds": 1, "mean_model": result.mean_model,
                "mean_reference": result.mean_reference, "difference": result.difference,
                "ci_low": result.ci_low, "ci_high": result.ci_high, "p_value": result.p_value,
                "p_seed": float("nan"), "seed_sd": float("nan")}
    import warnings

    with warnings.catch_warnings():  # a metric missing for every prompt (NaN) gives NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        if reference_SP.shape[0] == num_seeds:
            differences = model_SP - reference_SP  # seed i against seed i: independent runs, paired by prompt
        else:
            differences = model_SP - np.nanmean(reference_SP, axis=0, keepdims=True)
        usable = ~np.isnan(differences).all(axis=0)
        differences = differences[:, usable]
        per_seed = np.nanmean(differences, axis=1)
        per_prompt = np.nanmean(differences, axis=0)
        model_means = np.nanmean(model_SP[:, usable], axis=1)
        reference_means = np.nanmean(reference_SP[:, usable], axis=1)
        return _seeded_result(model_means, reference_means, per_seed, per_prompt, differences, num_seeds,
                              bootstrap_rounds, permutation_rounds, seed)


def _seeded_result(model_means: np.ndarray, reference_means: np.ndarray, per_seed: np.ndarray,
                   per_prompt: np.ndarray, differences: np.ndarray, num_seeds: int, bootstrap_rounds: int,
                   permutation_rounds: int, seed: int) -> dict[str, Any]:
    ci_low, ci_high = stats.two_level_bootstrap_ci(differences, bootstrap_rounds, seed=seed)
    return {"num_pairs": int(differences.shape[1]), "num_seeds": int(num_seeds),
            "mean_model": float(np.nanmean(model_means)), "mean_reference": float(np.nanmean(reference_means)),
            "difference": float(np.nanmean(per_seed)), "ci_low": ci_low, "ci_high": ci_high,
            "p_value": stats.sign_flip_permutation_p(per_prompt, permutation_rounds, seed=seed),
            "p_seed": stats.seed_permutation_p(model_means, reference_means),
            "seed_sd": float(np.std(per_seed, ddof=1)) if num_seeds > 1 else float("nan")}


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


def positive_control_sentence(table: pd.DataFrame, control_label: str, versus: str = VERSUS_BASE,
                              kind: str = "degeneration") -> str:
    """Did the instrument detect the control? On the raw diversity metrics (significant after Holm) and on the
    quality-aware ones (the headline metric's CI excludes 0); a quality-preserving control is detected only on
    the latter, a degeneration control's raw change is labelled for what it is."""
    name = f"{kind.capitalize()} control `{control_label}`"
    rows = table[(table["model"] == control_label) & (table["versus"] == versus)]
    raw = rows[rows["family"] == FAMILY_DIVERSITY]
    if raw.empty:
        return f"{name}: no comparison vs {versus} was run, so the instrument is untested."
    found = raw[raw["significant"]].sort_values("p_holm")
    if found.empty:
        raw_part = (f"the instrument did NOT detect a diversity change vs {versus} on the raw metrics (no metric "
                    f"significant after Holm over {len(raw)} tests)")
    else:
        best = found.iloc[0]
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raw_part = (f"the instrument detected a diversity change vs {versus} "
                    f"({best['metric']} {best['scope']} {_effect(best)}{more}) on the raw metrics")
    headline = _row(rows, HEADLINE_METRIC)
    if headline is None:
        return f"{name}: {raw_part}; quality-aware metrics not measured."
    verdict = reading(rows)
    detected = bool(headline["counts"]) and headline["difference"] > 0
    aware = (f"on the quality-aware metrics it {'detected' if detected else 'did NOT detect'} more diversity "
             f"({HEADLINE_METRIC} {_ci(headline)}, {_scale(headline)})")
    tail = f"; reading: {verdict}" if verdict == DEGENERATION else ""
    if kind != "degeneration" and not detected:
        tail += ("; so a null quality-aware finding elsewhere means 'not measurable at this scale', not 'no "
                 "effect'")
    return f"{name}: {raw_part}; {aware}{tail}."


def plot_paired_differences(table: pd.DataFrame, path: Path, versus: str = VERSUS_BASE,
                            family: str = FAMILY_DIVERSITY,
                            higher_is_more_diverse: Mapping[str, bool] = HIGHER_IS_MORE_DIVERSE,
                            names: Mapping[str, str] | None = None) -> Path:
    """PNG: per metric, each model's paired difference vs `versus` with 95% CI per scope; filled = counts (CI
    excludes 0). Series are labelled by dataset (`names`: dataset -> short name), the legend sits outside."""
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
            label = (with_setting((names or {}).get(str(dataset), f"dataset {dataset}"), series["setting"].iloc[0])
                     if dataset is not None else model)
            for position, scope in enumerate(scopes):
                if scope not in series.index:
                    continue
                row = series.loc[scope]
                x = position - 0.35 + width * (index + 0.5)
                axis.errorbar([x], [row["difference"]], fmt="o", color=f"C{index}", capsize=3,
                              yerr=[[row["difference"] - row["ci_low"]], [row["ci_high"] - row["difference"]]],
                              markerfacecolor=f"C{index}" if row.get("counts", row["significant"]) else "white",
                              label=label if position == 0 else None)
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(scopes)), scopes)
        arrow = "↑" if higher_is_more_diverse.get(raw_metric_name(metric), True) else "↓"
        axis.set_title(f"{metric} − {versus}\n({arrow} = more diverse)", fontsize=9)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    if models:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                   title="filled = CI excludes 0", title_fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend outside the axes and every title kept whole
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The headline: a few plain sentences and one compact table, on the quality-aware metrics
# ----------------------------------------------------------------------------------------------

HEADLINE_METRIC = "utility_k"
HEADLINE_COLUMNS = ("utility_k", "distinct_k", "effective_vendi", "valid_rate", "embedding_distance",
                    "distinct_2", "quality_logprob", "completion_rate")
RAW_DIVERSITY_FOR_DEGENERATION = ("embedding_distance", "vendi", "distinct_2")
QUALITY_FOR_DEGENERATION = ("valid_rate", "quality_logprob")
MAX_SENTENCES = 6
DEGENERATION = "diversity through degeneration"


def _row(rows: pd.DataFrame, metric: str) -> pd.Series | None:
    match = rows[(rows["metric"] == metric) & (rows["scope"] == OVERALL)]
    return None if match.empty else match.iloc[0]


def _quality_aware_gain(headline: pd.Series | None) -> bool:
    return headline is not None and bool(headline["counts"]) and headline["difference"] > 0


def reading(rows: pd.DataFrame, higher_is_more_diverse: Mapping[str, bool] = HIGHER_IS_MORE_DIVERSE) -> str:
    """What one comparison shows, in words: a quality-aware gain or loss, diversity through degeneration, or no
    change.

    Degeneration = a raw diversity metric counts as more diverse, validity or fluency counts as lower, and the
    quality-aware headline did not rise. A utility_k gain is counted over valid samples only (fluent and ended on
    their own), so a rise there with a lower mean fluency is more diversity among acceptable answers that the
    base model finds less likely, not breakage: it reads "at lower fluency" instead.
    """
    raw_up = [m for m in RAW_DIVERSITY_FOR_DEGENERATION if (r := _row(rows, m)) is not None and r["counts"]
              and _more_diverse(m, r["difference"], higher_is_more_diverse)]
    quality_down = [m for m in QUALITY_FOR_DEGENERATION if (r := _row(rows, m)) is not None and r["counts"]
                    and r["difference"] < 0]
    headline = _row(rows, HEADLINE_METRIC)
    if raw_up and quality_down and not _quality_aware_gain(headline):
        return DEGENERATION
    if headline is None or pd.isna(headline["difference"]):
        return "not measured"
    if _quality_aware_gain(headline):
        return "more quality-aware diversity" + (f", lower {' and '.join(quality_down)}" if quality_down else "")
    if headline["counts"]:
        return "less quality-aware diversity"
    return "no change that counts"


def _cell(row: pd.Series | None) -> str:
    if row is None or pd.isna(row["difference"]):
        return "-"
    return f"{row['difference']:+.3g}" + (" ✓" if row["counts"] else "")


def _ci(row: pd.Series) -> str:
    return f"{row['difference']:+.3g} [{row['ci_low']:+.3g}, {row['ci_high']:+.3g}]"


def _scale(row: pd.Series) -> str:
    seeds = int(row["num_seeds"]) if "num_seeds" in row and not pd.isna(row["num_seeds"]) else 1
    return f"{seeds} seed{'s' if seeds != 1 else ''}, {int(row['num_pairs'])} prompts"


def headline_sentence(rows: pd.DataFrame, name: str,
                      higher_is_more_diverse: Mapping[str, bool] = HIGHER_IS_MORE_DIVERSE) -> str:
    """One plain claim for one comparison, with its effect size and CI on utility_k (and the degeneration)."""
    first = rows.iloc[0]
    headline = _row(rows, HEADLINE_METRIC)
    verdict = reading(rows, higher_is_more_diverse)
    versus = "the base model" if first["versus"] == VERSUS_BASE else first["versus"]
    if headline is None:
        return f"{name} vs {versus}: quality-aware metrics not measured (evaluation without fluency or embeddings)."
    if headline["counts"]:
        claim = f"{name} {'raised' if headline['difference'] > 0 else 'reduced'} quality-aware diversity vs {versus}"
    else:
        claim = f"{name} did not change quality-aware diversity vs {versus} measurably"
    sentence = f"{claim}: {HEADLINE_METRIC} {_ci(headline)}, {_scale(headline)}"
    if verdict == DEGENERATION:
        raw = next(r for m in RAW_DIVERSITY_FOR_DEGENERATION if (r := _row(rows, m)) is not None and r["counts"]
                   and _more_diverse(m, r["difference"], higher_is_more_diverse))
        quality = next(r for m in QUALITY_FOR_DEGENERATION if (r := _row(rows, m)) is not None and r["counts"]
                       and r["difference"] < 0)
        sentence += (f"; its raw {raw['metric']} rose ({_ci(raw)}) while {quality['metric']} fell "
                     f"({_ci(quality)}): {DEGENERATION}")
    elif _quality_aware_gain(headline):
        lower = [r for m in QUALITY_FOR_DEGENERATION if (r := _row(rows, m)) is not None and r["counts"]
                 and r["difference"] < 0]
        if lower:
            sentence += (f"; its {lower[0]['metric']} fell ({_ci(lower[0])}), but the gain is among valid samples "
                         "only, so it is not degeneration")
    return sentence + "."


def headline_markdown(table: pd.DataFrame, names: Mapping[str, str] | None = None,
                      higher_is_more_diverse: Mapping[str, bool] = HIGHER_IS_MORE_DIVERSE) -> str:
    """At most MAX_SENTENCES plain sentences (comparisons vs base, datasets in order), then one compact table of
    every comparison: Δ (model − reference) per key metric, ✓ where the CI excludes 0."""
    names = {str(k): v for k, v in (names or {}).items()}
    if table.empty:
        return "No trained model had a reference to compare with.\n"
    groups = list(table.groupby(["model", "versus"], sort=False))

    several_models = "model_name" in table and table["model_name"].nunique() > 1

    def name_of(rows: pd.DataFrame) -> str:
        dataset = rows.iloc[0]["dataset"]
        name = with_setting(names.get(str(dataset), f"dataset {dataset}"), rows.iloc[0].get("setting"))
        return f"{name} on {str(rows.iloc[0]['model_name']).split('/')[-1]}" if several_models else name

    def order(item: tuple) -> tuple:
        (_, versus), rows = item
        dataset = str(rows.iloc[0]["dataset"])
        return (versus != VERSUS_BASE, not dataset.isdigit(), dataset)

    groups.sort(key=order)
    sentences = [headline_sentence(rows, name_of(rows), higher_is_more_diverse)
                 for (_, versus), rows in groups if versus == VERSUS_BASE][:MAX_SENTENCES]
    lines = [" ".join(sentences), "",
             "| comparison | seeds | " + " | ".join(HEADLINE_COLUMNS) + " | reading |",
             "|---|---|" + "---|" * len(HEADLINE_COLUMNS) + "---|"]
    for (_, versus), rows in groups:
        headline = _row(rows, HEADLINE_METRIC)
        seeds = int(headline["num_seeds"]) if headline is not None else int(rows.iloc[0]["num_seeds"])
        cells = [_cell(_row(rows, metric)) for metric in HEADLINE_COLUMNS]
        lines.append(f"| {name_of(rows)} vs {versus} | {seeds} | " + " | ".join(cells)
                     + f" | {reading(rows, higher_is_more_diverse)} |")
    lines += ["", "Cells: mean difference model − reference over prompts (and training seeds); ✓ = its 95% CI "
              "excludes 0 (two-level bootstrap over seeds and prompts when there are several seeds, else over "
              "prompts), the rule a finding counts by. utility_k, distinct_k, effective_vendi: diversity among "
              "valid samples only (NoveltyBench; effective Vendi); valid_rate: share of samples that are fluent "
              "and ended on their own; embedding_distance, distinct_2: raw diversity, which noise also raises; "
              f"\"{DEGENERATION}\" = a raw diversity metric up while valid_rate or fluency is down and {HEADLINE_METRIC} "
              "did not rise (a utility_k gain counts valid samples only, so a lower fluency beside it is read as "
              "\"lower fluency\", not degeneration).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Does model size matter? The same dataset's effect on two base models: a difference of paired differences
# ----------------------------------------------------------------------------------------------


def parameter_count(model_name: str) -> float:
    """Parameters read off the model's name ('SmolLM2-135M' -> 1.35e8, 'Qwen3-30B-A3B' -> 3e10); 0 when the
    name gives none (local/tiny), which sorts it first."""
    import re

    match = re.search(r"(\d+(?:\.\d+)?)\s*([MB])\b", model_name.split("/")[-1].replace("-", " "), re.IGNORECASE)
    if not match:
        return 0.0
    return float(match.group(1)) * (1e6 if match.group(2).upper() == "M" else 1e9)


def _differences(scores: Mapping[str, pd.DataFrame], comparison: Comparison, metric: str,
                 prompts: Sequence[str]) -> np.ndarray:
    """Seeds x prompts matrix of model − reference on `metric` (as paired_table pairs them)."""
    model_runs, reference_runs = comparison.runs()
    model_SP = np.array([scores[r].set_index("prompt_id").loc[list(prompts), metric].to_numpy(dtype=float)
                         for r in model_runs])
    reference_SP = np.array([scores[r].set_index("prompt_id").loc[list(prompts), metric].to_numpy(dtype=float)
                             for r in reference_runs])
    if reference_SP.shape[0] == model_SP.shape[0]:
        return model_SP - reference_SP
    return model_SP - np.nanmean(reference_SP, axis=0, keepdims=True)


def size_table(scores: Mapping[str, pd.DataFrame], comparisons: Sequence[Comparison],
               metric: str = HEADLINE_METRIC, bootstrap_rounds: int = stats.DEFAULT_BOOTSTRAP_ROUNDS,
               seed: int = 0) -> pd.DataFrame:
    """Per dataset and reference role, each pair of adjacent base models (by parameter count): both effects on
    `metric` and their difference (larger − smaller) with a CI over prompts and seeds (two-level bootstrap of the
    per-prompt difference of paired differences; seed i with seed i). Empty with one base model."""
    rows = []
    groups: dict[tuple, list[Comparison]] = {}
    for comparison in comparisons:
        if comparison.model_name is not None:
            groups.setdefault((comparison.dataset, comparison.setting, comparison.versus), []).append(comparison)
    for (dataset, setting, versus), group in groups.items():
        group = sorted(group, key=lambda c: (parameter_count(c.model_name or ""), c.model_name or ""))
        for smaller, larger in zip(group, group[1:]):
            labels = [*smaller.runs()[0], *smaller.runs()[1], *larger.runs()[0], *larger.runs()[1]]
            if any(label not in scores or metric not in scores[label] for label in labels):
                continue
            shared = set.intersection(*(set(scores[label]["prompt_id"]) for label in labels))
            prompts = sorted(shared)
            small_SP = _differences(scores, smaller, metric, prompts)
            large_SP = _differences(scores, larger, metric, prompts)
            if small_SP.shape[0] != large_SP.shape[0]:
                small_SP, large_SP = np.nanmean(small_SP, 0, keepdims=True), np.nanmean(large_SP, 0, keepdims=True)
            difference_SP = large_SP - small_SP
            ci_low, ci_high = stats.two_level_bootstrap_ci(difference_SP, bootstrap_rounds, seed=seed)
            rows.append({"dataset": dataset, "setting": setting, "versus": versus, "metric": metric,
                         "smaller": smaller.model_name, "larger": larger.model_name,
                         "effect_smaller": float(np.nanmean(small_SP)), "effect_larger": float(np.nanmean(large_SP)),
                         "difference": float(np.nanmean(difference_SP)), "ci_low": ci_low, "ci_high": ci_high,
                         "counts": bool(ci_low > 0 or ci_high < 0), "num_seeds": int(difference_SP.shape[0]),
                         "num_pairs": len(prompts)})
    return pd.DataFrame(rows, columns=["dataset", "setting", "versus", "metric", "smaller", "larger", "effect_smaller",
                                       "effect_larger", "difference", "ci_low", "ci_high", "counts", "num_seeds",
                                       "num_pairs"])


def size_sentences(table: pd.DataFrame, names: Mapping[str, str] | None = None) -> list[str]:
    """One sentence per row of `size_table`: does the dataset's effect differ between the two models?"""
    names = {str(k): v for k, v in (names or {}).items()}
    sentences = []
    for row in table.itertuples():
        name = with_setting(names.get(str(row.dataset), f"dataset {row.dataset}"), row.setting)
        small, large = str(row.smaller).split("/")[-1], str(row.larger).split("/")[-1]
        verdict = "differs" if row.counts else "does not differ measurably"
        sentences.append(
            f"{name}: its effect on {row.metric} vs {row.versus} {verdict} between {small} and {large} "
            f"({row.effect_smaller:+.3g} → {row.effect_larger:+.3g}; larger − smaller {row.difference:+.3g} "
            f"[{row.ci_low:+.3g}, {row.ci_high:+.3g}], {row.num_seeds} seed{'s' if row.num_seeds != 1 else ''}, "
            f"{row.num_pairs} prompts).")
    return sentences


def plot_size(table: pd.DataFrame, path: Path, names: Mapping[str, str] | None = None) -> Path:
    """PNG: each dataset's effect vs base (y) against model size (x, by parameter count), one line per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {str(k): v for k, v in (names or {}).items()}
    rows = table[table["versus"] == VERSUS_BASE]
    fig, axis = plt.subplots(figsize=(5.5, 3.6))
    models: list[str] = []
    for row in rows.itertuples():
        for model in (row.smaller, row.larger):
            if model not in models:
                models.append(model)
    models.sort(key=lambda m: (parameter_count(m), m))
    for index, ((dataset, setting), part) in enumerate(rows.groupby(["dataset", "setting"], sort=False)):
        effects = {r.smaller: r.effect_smaller for r in part.itertuples()} | {
            r.larger: r.effect_larger for r in part.itertuples()}
        xs = [models.index(m) for m in effects]
        axis.plot(xs, list(effects.values()), marker="o", color=f"C{index}",
                  label=with_setting(names.get(str(dataset), f"dataset {dataset}"), setting))
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(models)), [m.split("/")[-1] for m in models], fontsize=8)
    axis.set_xlabel("base model (by parameter count)")
    metric = rows["metric"].iloc[0] if len(rows) else HEADLINE_METRIC
    axis.set_ylabel(f"{metric}: model − base")
    axis.set_title("Effect vs model size", fontsize=10)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
