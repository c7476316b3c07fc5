"""Sample k completions per eval prompt from a model, score their diversity and fluency, aggregate by creativity.

Per evaluated model, `<out_dir>/` holds `samples.jsonl` (every completion), `scores.parquet` (one row per
prompt: creativity, bucket, every metric) and `summary.json` (means with bootstrap 95% CIs, overall and per
creativity bucket). Quality sits next to diversity so gibberish does not pass as "diverse": `quality_judge` is the
base model's 1-10 rating of each sample under a quality rubric (dpo_core.judge, expected rating from its
next-token distribution), the quality the report uses; `quality_logprob` is the base model's mean token logprob
(fluency). The logprob is exactly dataset 2's selection signal, so a dataset-2 model scoring higher on it is
circular; the judge's rubric score is a different question to the same base model, not the selection signal.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dpo_core import diversity, novelty
from dpo_core.config import EvalConfig
from dpo_core.data import EvalPrompt
from dpo_core.fsutil import atomic_folder

if TYPE_CHECKING:  # `import tinker` imports torch: only where a model is sampled (the report reads BUCKETS)
    import tinker

BUCKETS = ("low", "mid", "high")
METRICS = ("distinct_1", "distinct_2", "self_bleu", "compression_ratio", "embedding_distance", "vendi",
           "mean_words", "mean_tokens", "quality_judge", "quality_logprob", *novelty.QUALITY_AWARE_METRICS,
           "completion_rate")


class EvalOverlapError(ValueError):
    """Eval prompts that also appear in the training data would measure memorisation, not diversity."""


@dataclass(frozen=True)
class EvalTarget:
    """What to evaluate: a base model (model_path None) or a trained checkpoint."""

    label: str
    model_name: str
    model_path: str | None = None
    renderer_name: str | None = None  # the run's (config.json); None = the model's default
    instruction: str | None = None  # put before every eval prompt (the prompting baseline); None = prompt as is


def instructed(prompt: str, instruction: str | None) -> str:
    """The eval prompt as the model sees it: the instruction, a blank line, the prompt."""
    return prompt if not instruction else f"{instruction}\n\n{prompt}"


def bucket_of(creativity: float, edges: tuple[float, float]) -> str:
    return "low" if creativity < edges[0] else ("mid" if creativity < edges[1] else "high")


def select_prompts(prompts: Sequence[EvalPrompt], config: EvalConfig) -> list[EvalPrompt]:
    """All prompts, or `max_prompts` of them spread evenly over the creativity buckets (deterministic)."""
    if config.max_prompts is None or config.max_prompts >= len(prompts):
        return list(prompts)
    by_bucket: dict[str, list[EvalPrompt]] = {b: [] for b in BUCKETS}
    for prompt in sorted(prompts, key=lambda p: p.prompt_id):
        by_bucket[bucket_of(prompt.creativity_score, config.bucket_edges)].append(prompt)
    chosen: list[EvalPrompt] = []
    while len(chosen) < config.max_prompts and any(by_bucket.values()):
        for bucket in BUCKETS:
            if by_bucket[bucket] and len(chosen) < config.max_prompts:
                chosen.append(by_bucket[bucket].pop(0))
    return sorted(chosen, key=lambda p: p.prompt_id)


def check_no_overlap(prompts: Sequence[EvalPrompt], training_prompts: set[str], source: str) -> None:
    normalised = {" ".join(t.split()).lower() for t in training_prompts}
    for prompt in prompts:
        if " ".join(prompt.prompt.split()).lower() in normalised:
            raise EvalOverlapError(f"eval prompt {prompt.prompt_id!r} also appears in the training data ({source}): "
                                   "remove it from the eval set or the dataset")


def sample_and_score(
    service_client: tinker.ServiceClient,
    target: EvalTarget,
    prompts: Sequence[EvalPrompt],
    config: EvalConfig,
    embedder: diversity.Embedder | None,
    out_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample, score and write the three files for one model; returns the summary."""
    from dpo_core.sampling import Sampler

    sampler = Sampler(target.model_name, target.model_path, config.temperature, config.max_tokens,
                      top_p=config.top_p, seed=config.seed, renderer_name=target.renderer_name,
                      service_client=service_client)
    # Each request asks for all k samples of one prompt; a window of `concurrency` requests in flight.
    with _sampling_base(target):
        pools = sampler.sample_many([instructed(p.prompt, target.instruction) for p in prompts], config.num_samples,
                                    concurrency=config.concurrency,
                                    progress=f"sampling {target.label}" if progress else None)
    completions = [c for pool in pools for c in pool]
    samples: list[dict[str, Any]] = [
        {"prompt_id": prompt.prompt_id, "sample_index": index, "text": c.text, "num_tokens": len(c.tokens),
         "stop_reason": c.stop_reason}
        for prompt, pool in zip(prompts, pools) for index, c in enumerate(pool)]
    if config.quality:
        for sample, score in zip(samples, _fluency(sampler, target, completions, service_client)):
            sample["quality_logprob"] = score
    if config.quality_judge:
        from dpo_core.judge import QUALITY_RUBRIC, rubric_ratings

        text_of = {p.prompt_id: p.prompt for p in prompts}
        ratings = rubric_ratings(service_client, target.model_name, QUALITY_RUBRIC,
                                 [(text_of[s["prompt_id"]], s["text"]) for s in samples])
        for sample, rating in zip(samples, ratings):
            sample["quality_judge"] = rating

    texts = [s["text"] for s in samples]
    vectors = embedder.encode(texts) if embedder is not None else None
    rows = []
    for prompt in prompts:
        indices = [i for i, s in enumerate(samples) if s["prompt_id"] == prompt.prompt_id]
        own = [samples[i] for i in indices]
        scores = diversity.score_samples([s["text"] for s in own], None if vectors is None else vectors[indices],
                                         [s["num_tokens"] for s in own])
        if config.quality:
            scores["quality_logprob"] = float(np.nanmean([s["quality_logprob"] for s in own]))
        if config.quality_judge:
            judged = [s["quality_judge"] for s in own if not np.isnan(s["quality_judge"])]
            scores["quality_judge"] = float(np.mean(judged)) if judged else float("nan")
        scores["completion_rate"] = float(np.mean([s["stop_reason"] != novelty.TRUNCATED for s in own]))
        if config.quality and vectors is not None:
            valid = novelty.validity([s["quality_logprob"] for s in own], [s["stop_reason"] for s in own],
                                     config.fluency_floor, [s.get("quality_judge", np.nan) for s in own],
                                     config.judge_floor, config.truncated_is_invalid)
            for sample, ok in zip(own, valid):
                sample["valid"] = bool(ok)
            scores |= novelty.score_quality_aware(vectors[indices], valid, config.similarity_threshold,
                                                  config.patience)
        rows.append({"prompt_id": prompt.prompt_id, "creativity_score": prompt.creativity_score,
                     "bucket": bucket_of(prompt.creativity_score, config.bucket_edges), **scores})
    table = pd.DataFrame(rows)
    summary = {**_provenance(target, config), "num_prompts": len(prompts), "num_samples": config.num_samples,
               **aggregate(table, config)}
    _write_outputs(out_dir, samples, table, summary)
    return summary


# What a complete evaluation folder holds (written together by _write_outputs).
EVAL_FILES = ("summary.json", "scores.parquet", "samples.jsonl")


def _provenance(target: EvalTarget, config: EvalConfig) -> dict[str, Any]:
    """What an evaluation folder's summary records about how it was computed (the folder's name adds the
    service, the weights and the prompts)."""
    from dpo_core.code_version import code_fingerprint

    return {"label": target.label, "model_name": target.model_name, "model_path": target.model_path,
            "instruction": target.instruction, "renderer_name": target.renderer_name,
            "eval_config": config.model_dump(mode="json"), "code": code_fingerprint()}


def finished_evaluation(out_dir: Path, target: EvalTarget, config: EvalConfig) -> dict[str, Any] | None:
    """The summary of a complete evaluation in `out_dir` that this code would compute again for `target`, or
    None: a folder written by other code, for another checkpoint or label, or under other settings is redone."""
    out_dir = Path(out_dir)
    if not all((out_dir / name).is_file() for name in EVAL_FILES):
        return None
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    expected = _provenance(target, config)
    if not isinstance(summary, dict) or any(summary.get(key) != value for key, value in expected.items()):
        return None
    return summary


def _fluency(sampler: Any, target: EvalTarget, completions: list[Any], service_client: Any) -> list[float]:
    """The base model's mean token logprob of each completion.

    A base model sampled at temperature 1 without a nucleus already returned exactly these logprobs with its
    samples, so only trained checkpoints pay the scoring pass (a forward over prompt + response per sample,
    which cost as much as sampling itself on a CPU).
    """
    from dpo_core.sampling import Sampler

    if target.model_path is None and sampler.samples_are_model_logprobs() and all(
            c.logprobs is not None and len(c.logprobs) == len(c.tokens) for c in completions):
        return [float(np.mean(c.logprobs)) if c.tokens else float("nan") for c in completions]
    base = Sampler(target.model_name, renderer_name=target.renderer_name, service_client=service_client)
    _wait_for_base_sampling(target.model_name)
    return base.mean_logprobs(completions)


# Base models being sampled by evaluations in this process (a suite evaluates the base model and its
# checkpoints concurrently). The local server batches queued requests of the same model together, scoring
# requests included: a checkpoint's 96 scoring requests queued beside the base model's sampling rode along its
# 64-step decode as dead rows (measured: one 224-row batch, 192 of them scoring rows, took 36% of the server's
# time). So scoring on a base model waits until this process has finished sampling it.
_BASE_SAMPLING: dict[str, int] = {}
_BASE_SAMPLING_DONE = threading.Condition()


@contextlib.contextmanager
def _sampling_base(target: EvalTarget):
    if target.model_path is not None:
        yield
        return
    with _BASE_SAMPLING_DONE:
        _BASE_SAMPLING[target.model_name] = _BASE_SAMPLING.get(target.model_name, 0) + 1
    try:
        yield
    finally:
        with _BASE_SAMPLING_DONE:
            _BASE_SAMPLING[target.model_name] -= 1
            _BASE_SAMPLING_DONE.notify_all()


def _wait_for_base_sampling(model_name: str) -> None:
    with _BASE_SAMPLING_DONE:
        _BASE_SAMPLING_DONE.wait_for(lambda: not _BASE_SAMPLING.get(model_name))


def aggregate(table: pd.DataFrame, config: EvalConfig) -> dict[str, Any]:
    """Mean and bootstrap 95% CI over prompts, overall and per creativity bucket, for every metric present."""
    rng = np.random.default_rng(config.seed)
    metrics = [m for m in METRICS if m in table.columns]
    result: dict[str, Any] = {"overall": {}, "buckets": {}}
    for metric in metrics:
        result["overall"][metric] = _mean_ci(table[metric].to_numpy(dtype=float), config.bootstrap, rng)
    for bucket in BUCKETS:
        part = table[table["bucket"] == bucket]
        if len(part):
            result["buckets"][bucket] = {"num_prompts": int(len(part)), **{
                m: _mean_ci(part[m].to_numpy(dtype=float), config.bootstrap, rng) for m in metrics}}
    return result


def _mean_ci(values: np.ndarray, rounds: int, rng: np.random.Generator) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    means = rng.choice(values, size=(rounds, values.size), replace=True).mean(axis=1)
    return {"mean": float(values.mean()), "ci_low": float(np.percentile(means, 2.5)),
            "ci_high": float(np.percentile(means, 97.5))}


def _write_outputs(out_dir: Path, samples: list[dict], table: pd.DataFrame, summary: dict) -> None:
    """All three files appear together: an interrupted evaluation leaves no half-written folder."""
    with atomic_folder(Path(out_dir)) as tmp:
        (tmp / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        table.to_parquet(tmp / "scores.parquet", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
