"""Build the three preference datasets from pools of sampled candidates (embedding, quality, LLM-judge criteria).

For each prompt, sample `num_candidates` responses from a base model, score each candidate, and pick one
(chosen, rejected) pair per criterion:

- quality q: the judge's 1-10 rubric score when `judge_quality` is on, else the base model's mean token logprob
  of the candidate (a fluency proxy: higher = more fluent);
- dataset 1, embedding diversity (DivPO-style): d_i = mean cosine distance of candidate i's embedding to the
  other candidates of its prompt. Among the candidates whose quality is in the top ρ fraction, chosen = argmax d;
  among the bottom ρ fraction, rejected = argmin d;
- dataset 2, quality: chosen = argmax q, rejected = argmin q;
- dataset 3, LLM-judge diversity: as dataset 1 with the judge's 1-10 originality score o_i in place of d_i
  (by default the expected rating under the judge's next-token distribution after "Rating: ", see
  `rating_from_distribution`; `judge_scoring=text` parses a sampled reply instead).
Ties break toward the better quality (chosen) / worse quality (rejected), then the lower index. A pair whose two
texts are identical (after whitespace normalisation) or whose embeddings are closer than `min_distance` is
dropped and counted. Per-prompt stages (candidates, scores) are cached on disk by content hash, so adding
prompts only samples the new ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from dpo_core import diversity
from dpo_core.config import LOCAL_DEFAULT_MODEL, FrozenModel
from dpo_core.data import DATASET_FILES, DatasetError, read_table
from dpo_core.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # tinker imports torch: loaded by the stages that sample, not by importing the config
    import tinker

CRITERIA = {1: "embedding_diversity", 2: "quality", 3: "llm_judge_diversity"}


class PairsConfig(FrozenModel):
    """How candidates are sampled and judged, and how pairs are picked."""

    prompts: str
    """Prompt file (parquet/jsonl) with a prompt column, and optionally prompt_id and creativity_score."""
    model_name: str = LOCAL_DEFAULT_MODEL
    """Base model that samples the candidates."""
    num_candidates: int = Field(default=8, ge=2)
    """Candidates sampled per prompt."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the candidates."""
    max_tokens: int = Field(default=128, ge=1)
    """Tokens per candidate."""
    seed: int = 0
    """Sampling seed."""
    rho: float = Field(default=0.5, gt=0, le=1)
    """Quality fraction (DivPO's rho): chosen comes from the top rho of the candidates by quality, rejected from
    the bottom rho.
    """
    judge_model: str | None = None
    """Model that judges originality (and quality, with judge_quality); none = model_name."""
    judge_quality: bool = False
    """Quality from the judge's 1-10 rubric instead of the mean-logprob fluency proxy."""
    judge_retries: int = Field(default=3, ge=1)
    """Text scoring: ask again this many times when a reply has no valid number."""
    judge_scoring: Literal["distribution", "text"] = "distribution"
    """distribution: the expected 1-10 rating under the judge's next-token distribution after 'Rating: ' (always
    parseable, graded); text: the first 1-10 number of a sampled reply.
    """
    judge_min_mass: float = Field(default=0.5, gt=0, le=1)
    """Distribution scoring: the least probability the judge must put on the ratings 1-10 for a score to count."""
    min_distance: float = Field(default=0.02, ge=0)
    """Drop a pair whose two answers are closer than this cosine distance."""
    exclude_truncated: bool = True
    """Pair hygiene: leave out candidates cut off at max_tokens, mid-answer (DPO would learn "shorter/longer" from
    them rather than the criterion); counted in pairs_summary.json either way.
    """
    max_length_ratio: float | None = Field(default=None, ge=1)
    """Length-balanced selection: no pair whose longer answer has more than this many times the shorter's words
    (the next-best rejected candidate is tried instead); none = no limit.
    """
    max_prompts: int | None = Field(default=None, ge=1)
    """Use only the first this many prompts; none = all."""
    out_dir: str = "data"
    """Folder the three datasets and pairs_summary.json are written to."""


# ----------------------------------------------------------------------------------------------
# Selection rules (pure)
# ----------------------------------------------------------------------------------------------


def _top_bottom(quality: Sequence[float], rho: float) -> tuple[list[int], list[int]]:
    k = len(quality)
    size = max(1, math.ceil(rho * k))
    order = sorted(range(k), key=lambda i: (-quality[i], i))
    return order[:size], order[-size:]


def select_by_score(quality: Sequence[float], score: Sequence[float], rho: float) -> tuple[int, int] | None:
    """chosen = highest score among the top-ρ quality, rejected = lowest score among the bottom-ρ quality.

    Candidates with a NaN score or quality take no part. None when no two distinct candidates qualify.
    """
    valid = [i for i in range(len(quality)) if not (math.isnan(quality[i]) or math.isnan(score[i]))]
    if len(valid) < 2:
        return None
    q = [quality[i] for i in valid]
    top, bottom = _top_bottom(q, rho)
    chosen = max(top, key=lambda j: (score[valid[j]], q[j], -j))
    rejected = min((j for j in bottom if j != chosen), key=lambda j: (score[valid[j]], q[j], j), default=None)
    if rejected is None:
        return None
    return valid[chosen], valid[rejected]


def select_by_quality(quality: Sequence[float]) -> tuple[int, int] | None:
    """chosen = best quality, rejected = worst; None when every candidate has the same quality."""
    valid = [i for i in range(len(quality)) if not math.isnan(quality[i])]
    if len(valid) < 2:
        return None
    chosen = max(valid, key=lambda i: (quality[i], -i))
    rejected = min(valid, key=lambda i: (quality[i], i))
    if quality[chosen] == quality[rejected]:
        return None
    return chosen, rejected


def length_ratio(a_words: int, b_words: int) -> float:
    """Longer / shorter word count (inf when one text is empty)."""
    low, high = sorted((a_words, b_words))
    return math.inf if low == 0 else high / low


def select_length_balanced(select: Callable[[list[float]], tuple[int, int] | None], quality: Sequence[float],
                           words: Sequence[int], max_ratio: float | None) -> tuple[int, int] | None:
    """`select(quality)`, retried without each rejected candidate whose length is more than `max_ratio` times
    off the chosen one's (its quality set to NaN takes it out of every selection rule)."""
    remaining = list(quality)
    while True:
        pick = select(remaining)
        if pick is None or max_ratio is None or length_ratio(words[pick[0]], words[pick[1]]) <= max_ratio:
            return pick
        remaining[pick[1]] = math.nan


def truncated(pool: Sequence[dict], max_tokens: int) -> list[bool]:
    """Which candidates stopped at max_tokens (cut mid-answer)."""
    return [len(candidate["tokens"]) >= max_tokens for candidate in pool]


def mean_distances(embeddings: np.ndarray) -> list[float]:
    """d_i: mean cosine distance of row i to every other row."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    k = len(unit)
    return [float((1.0 - similarity[i]).sum() / (k - 1)) if k > 1 else 0.0 for i in range(k)]


# ----------------------------------------------------------------------------------------------
# Stages (each cached per prompt on disk)
# ----------------------------------------------------------------------------------------------


def load_prompts(path: Path, max_prompts: int | None = None) -> list[dict[str, Any]]:
    table = read_table(Path(path))
    if "prompt" not in table.columns:
        raise DatasetError(path, f"is missing (columns present: {list(table.columns)})", column="prompt")
    rows = []
    for row, record in enumerate(table.to_dict("records")):
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(path, "must be a non-empty string", row=row, column="prompt")
        creativity = record.get("creativity_score")
        rows.append({
            "prompt_id": str(record.get("prompt_id") or "p-" + hashlib.sha1(text.encode()).hexdigest()[:10]),
            "prompt": text,
            "creativity_score": None if creativity is None or pd.isna(creativity) else float(creativity),
        })
    return rows[:max_prompts] if max_prompts else rows


class StageCache:
    """JSON files under `<cache_dir>/pairs/<stage>/<key>.json`, keyed by the content that decides them and by
    `service` (the identities of the services and weights that compute them, `dpo_core.service`): a value
    sampled or judged by one server's weights never answers for another's under the same model name."""

    def __init__(self, root: Path, service: str = ""):
        self.root = Path(root)
        self.service = service
        self.hits = 0
        self.misses = 0

    def key(self, *parts: Any) -> str:
        raw = json.dumps([self.service, *parts] if self.service else list(parts), sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def get(self, stage: str, key: str) -> Any:
        path = self.root / stage / f"{key}.json"
        if path.exists():
            self.hits += 1
            return json.loads(path.read_text())
        self.misses += 1
        return None

    def put(self, stage: str, key: str, value: Any) -> None:
        atomic_write_bytes(self.root / stage / f"{key}.json", json.dumps(value).encode())


def sample_candidates(service_client: tinker.ServiceClient, prompts: list[dict], config: PairsConfig,
                      cache: StageCache) -> dict[str, list[dict]]:
    """prompt_id -> candidates [{text, tokens, prompt_tokens}]; all uncached prompts in flight at once."""
    from dpo_core.sampling import Sampler

    params = {"model": config.model_name, "k": config.num_candidates, "t": config.temperature,
              "max_tokens": config.max_tokens, "seed": config.seed}
    out, todo = {}, []
    for prompt in prompts:
        key = cache.key("candidates", params, prompt["prompt"])
        cached = cache.get("candidates", key)
        if cached is not None:
            out[prompt["prompt_id"]] = cached
        else:
            todo.append((prompt, key))
    if todo:
        sampler = Sampler(config.model_name, temperature=config.temperature, max_tokens=config.max_tokens,
                          seed=config.seed, service_client=service_client)
        pools = sampler.sample_many([prompt["prompt"] for prompt, _ in todo], config.num_candidates)
        for (prompt, key), pool in zip(todo, pools):
            candidates = [{"text": c.text, "tokens": c.tokens, "prompt_tokens": c.prompt_tokens} for c in pool]
            cache.put("candidates", key, candidates)
            out[prompt["prompt_id"]] = candidates
    return out


def logprob_quality(service_client: tinker.ServiceClient, model_name: str, candidates: dict[str, list[dict]],
                    cache: StageCache) -> dict[str, list[float]]:
    """Mean token logprob of each candidate under the base model (NaN for an empty candidate)."""
    from dpo_core.sampling import Completion, Sampler

    out, todo = {}, []
    for prompt_id, pool in candidates.items():
        key = cache.key("logprob", model_name, pool)
        cached = cache.get("quality", key)
        if cached is not None:
            out[prompt_id] = cached
        else:
            todo.append((prompt_id, key, pool))
    if todo:
        base = Sampler(model_name, service_client=service_client)
        flat = [Completion(c["text"], c["tokens"], c["prompt_tokens"]) for _, _, pool in todo for c in pool]
        scores = iter(base.mean_logprobs(flat))
        for prompt_id, key, pool in todo:
            out[prompt_id] = [next(scores) for _ in pool]
            cache.put("quality", key, out[prompt_id])
    return out


# ----------------------------------------------------------------------------------------------
# The three datasets
# ----------------------------------------------------------------------------------------------


def _normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def build_datasets(prompts: list[dict], candidates: dict[str, list[dict]], quality: dict[str, list[float]],
                   originality: dict[str, list[float]], embeddings: dict[str, np.ndarray], config: PairsConfig
                   ) -> tuple[dict[int, pd.DataFrame], dict[str, Any]]:
    """Pick the pairs per criterion; returns the three tables and a summary (yield, drops, gaps)."""
    rows: dict[int, list[dict]] = {1: [], 2: [], 3: []}
    dropped = {1: 0, 2: 0, 3: 0}
    no_pair = {1: 0, 2: 0, 3: 0}
    truncated_count = 0
    for prompt in prompts:
        pid = prompt["prompt_id"]
        pool, q, vectors = candidates[pid], list(quality[pid]), embeddings[pid]
        d = mean_distances(vectors)
        cut = truncated(pool, config.max_tokens)
        truncated_count += sum(cut)
        if config.exclude_truncated:
            q = [math.nan if was_cut else value for value, was_cut in zip(q, cut)]
        words = [len(candidate["text"].split()) for candidate in pool]
        scores = {1: ("diversity", d), 2: ("quality", q), 3: ("originality", originality[pid])}
        rules = {1: lambda qq: select_by_score(qq, d, config.rho), 2: select_by_quality,
                 3: lambda qq, o=originality[pid]: select_by_score(qq, o, config.rho)}
        picks = {n: select_length_balanced(rule, q, words, config.max_length_ratio) for n, rule in rules.items()}
        for number, pick in picks.items():
            if pick is None:
                no_pair[number] += 1
                continue
            chosen, rejected = pick
            distance = 1.0 - float(vectors[chosen] @ vectors[rejected] /
                                   max(np.linalg.norm(vectors[chosen]) * np.linalg.norm(vectors[rejected]), 1e-12))
            if _normalised(pool[chosen]["text"]) == _normalised(pool[rejected]["text"]) or \
                    not pool[chosen]["text"].strip() or not pool[rejected]["text"].strip() or \
                    distance < config.min_distance:
                dropped[number] += 1
                continue
            name, values = scores[number]
            rows[number].append({
                "prompt_id": pid, "prompt": prompt["prompt"], "chosen": pool[chosen]["text"],
                "rejected": pool[rejected]["text"], "creativity_score": prompt["creativity_score"],
                "criterion": CRITERIA[number], "chosen_quality": q[chosen], "rejected_quality": q[rejected],
                f"chosen_{name}": values[chosen], f"rejected_{name}": values[rejected],
                "chosen_diversity": d[chosen], "rejected_diversity": d[rejected],
                "chosen_words": words[chosen], "rejected_words": words[rejected],
                "chosen_truncated": cut[chosen], "rejected_truncated": cut[rejected],
                "model": config.model_name, "judge_model": config.judge_model or config.model_name,
                "seed": config.seed, "num_candidates": len(pool),
            })
    tables = {n: pd.DataFrame(r) for n, r in rows.items()}
    summary = {"prompts": len(prompts), "per_dataset": {},
               "truncated_candidates": {"count": truncated_count, "excluded": config.exclude_truncated,
                                        "max_tokens": config.max_tokens},
               "max_length_ratio": config.max_length_ratio}
    for number, table in tables.items():
        gaps = {}
        if len(table):
            gaps = {"quality_gap_mean": float((table["chosen_quality"] - table["rejected_quality"]).mean()),
                    "diversity_gap_mean": float((table["chosen_diversity"] - table["rejected_diversity"]).mean()),
                    # chosen-vs-rejected length: DPO on summed logprobs learns a length gap as readily as the
                    # criterion, so it is reported next to the criterion's own gap
                    "chosen_words_mean": float(table["chosen_words"].mean()),
                    "rejected_words_mean": float(table["rejected_words"].mean()),
                    "length_gap_words_mean": float((table["chosen_words"] - table["rejected_words"]).mean()),
                    "pairs_with_truncated_text": int((table["chosen_truncated"] | table["rejected_truncated"]).sum())}
        summary["per_dataset"][number] = {"criterion": CRITERIA[number], "pairs": int(len(table)),
                                          "dropped_too_close": dropped[number], "no_pair": no_pair[number], **gaps}
    return tables, summary


def positive_control_pairs(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The positive control's pairs from built datasets: per prompt, chosen = the candidate with the highest
    embedding diversity d_i, rejected = the lowest, among every candidate text the tables hold for it, with no
    quality filter (built to change diversity strongly, so the study can show its instrument sees it).

    d_i is comparable across the tables because all of them rank the same candidate pool of a prompt. Prompts
    whose texts are all the same yield no pair."""
    texts: dict[str, dict[str, float]] = {}
    info: dict[str, dict[str, Any]] = {}
    for table in tables:
        for row in table.itertuples():
            info.setdefault(row.prompt_id, {"prompt": row.prompt, "creativity_score": row.creativity_score,
                                            "model": row.model, "seed": row.seed})
            pool = texts.setdefault(row.prompt_id, {})
            pool.setdefault(row.chosen, float(row.chosen_diversity))
            pool.setdefault(row.rejected, float(row.rejected_diversity))
    rows = []
    for prompt_id in sorted(texts):
        ranked = sorted(texts[prompt_id].items(), key=lambda item: (item[1], item[0]))
        (rejected, low), (chosen, high) = ranked[0], ranked[-1]
        if _normalised(chosen) == _normalised(rejected):
            continue
        rows.append({"prompt_id": prompt_id, "prompt": info[prompt_id]["prompt"], "chosen": chosen,
                     "rejected": rejected, "creativity_score": info[prompt_id]["creativity_score"],
                     "criterion": "positive_control_diversity", "chosen_diversity": high, "rejected_diversity": low,
                     "model": info[prompt_id]["model"], "seed": info[prompt_id]["seed"]})
    return pd.DataFrame(rows)


def write_positive_control(data_dir: Path) -> Path:
    """`<data_dir>/control_diversity.parquet` from the three datasets there (one documented command:
    `python -m dpo_core.pairs control data`)."""
    import io

    from dpo_core.data import CONTROL_DATASET_FILE

    tables = [pd.read_parquet(Path(data_dir) / DATASET_FILES[n]) for n in sorted(DATASET_FILES)
              if (Path(data_dir) / DATASET_FILES[n]).exists()]
    buffer = io.BytesIO()
    positive_control_pairs(tables).to_parquet(buffer, index=False)
    path = Path(data_dir) / CONTROL_DATASET_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_datasets(tables: dict[int, pd.DataFrame], out_dir: Path) -> dict[int, str]:
    """Write the three parquet files (each atomically) under their registry names."""
    import io

    written = {}
    for number, table in tables.items():
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        path = Path(out_dir) / DATASET_FILES[number]
        atomic_write_bytes(path, buffer.getvalue())
        written[number] = str(path)
    return written


def gap_plot(tables: dict[int, pd.DataFrame], out: Path) -> None:
    """Histograms of the chosen-minus-rejected quality and diversity gaps per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for number, table in tables.items():
        if not len(table):
            continue
        label = f"{number}: {CRITERIA[number]}"
        axes[0].hist(table["chosen_quality"] - table["rejected_quality"], bins=15, alpha=0.5, label=label)
        axes[1].hist(table["chosen_diversity"] - table["rejected_diversity"], bins=15, alpha=0.5, label=label)
    axes[0].set_title("quality gap (chosen - rejected)")
    axes[1].set_title("embedding-diversity gap (chosen - rejected)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def build_pairs(service_client: tinker.ServiceClient, config: PairsConfig, cache_dir: Path,
                backend: str | None = None) -> dict[str, Any]:
    """All stages for one prompts file; writes the three datasets and `pairs_summary.json`, returns the summary.
    `backend` is the settings' resolved backend (see `dpo_core.service.identify`)."""
    from dpo_core.judge import ORIGINALITY_RUBRIC, QUALITY_RUBRIC, judge_ratings
    from dpo_core.service import identify

    prompts = load_prompts(Path(config.prompts), config.max_prompts)
    judge = config.judge_model or config.model_name
    services = [identify(service_client, name, backend).key() for name in dict.fromkeys((config.model_name, judge))]
    cache = StageCache(Path(cache_dir) / "pairs", json.dumps(services))
    candidates = sample_candidates(service_client, prompts, config, cache)
    if config.judge_quality:
        quality, quality_failures = judge_ratings(service_client, judge, QUALITY_RUBRIC, prompts, candidates,
                                                  config, cache, "judge_quality")
    else:
        quality, quality_failures = logprob_quality(service_client, config.model_name, candidates, cache), 0
    originality, judge_failures = judge_ratings(service_client, judge, ORIGINALITY_RUBRIC, prompts, candidates,
                                                config, cache, "judge_originality")
    embedder = diversity.Embedder()
    embeddings = {pid: embedder.encode([c["text"] or " " for c in pool]) for pid, pool in candidates.items()}
    tables, summary = build_datasets(prompts, candidates, quality, originality, embeddings, config)
    out_dir = Path(config.out_dir)
    summary["files"] = write_datasets(tables, out_dir)
    summary["judge_failures"] = {"originality": judge_failures, "quality": quality_failures}
    summary["cache"] = {"hits": cache.hits, "misses": cache.misses}
    summary["config"] = config.model_dump(mode="json")
    gap_plot(tables, out_dir / "pairs_gaps.png")
    atomic_write_bytes(out_dir / "pairs_summary.json", json.dumps(summary, indent=2).encode())
    return summary


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "control":
        sys.exit("usage: python -m dpo_core.pairs control DATA_DIR")
    print(write_positive_control(Path(sys.argv[2])))
