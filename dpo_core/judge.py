"""The LLM judge: a 1-10 rating of each candidate under a rubric, from its next-token distribution (default) or
a sampled reply. Used by dpo_core.pairs for dataset 3 (originality) and, optionally, quality."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import tinker

from dpo_core import rendering

if TYPE_CHECKING:
    from dpo_core.pairs import PairsConfig, StageCache

ORIGINALITY_RUBRIC = (
    "Rate how original and creative the response below is, from 1 (generic, predictable) to 10 (novel, "
    "surprising, unlike typical answers). Reply with the number only.\n\nTask: {prompt}\n\nResponse: {response}"
)
QUALITY_RUBRIC = (
    "Rate the quality of the response below (helpful, correct, fluent, on task) from 1 (poor) to 10 "
    "(excellent). Reply with the number only.\n\nTask: {prompt}\n\nResponse: {response}"
)


def parse_rating(text: str) -> float | None:
    """The first integer 1-10 in a judge's reply, or None (the reply is then retried or recorded as failed)."""
    for match in re.finditer(r"\d+", text):
        value = int(match.group())
        if 1 <= value <= 10:
            return float(value)
    return None


RATING_PREFILL = "Rating: "


def rating_from_distribution(first_token: dict[str, float], zero_after_one: float, min_mass: float
                             ) -> tuple[float | None, float]:
    """Expected 1-10 rating from the judge's next-token probabilities after the prefill "Rating: ".

    `first_token` maps each decoded candidate first token to its probability (tokens the judge did not rank get
    0); `zero_after_one` is P("0" | "1"), splitting the mass of "1" between the ratings 1 and 10 (tokenizers that
    spell numbers digit by digit). Returns (rating, mass on valid ratings); the rating is None when the mass is
    below `min_mass` (the judge was not answering with a number).
    """
    mass_of: dict[int, float] = {}
    for text, prob in first_token.items():
        text = text.strip()
        if re.fullmatch(r"[1-9]|10", text):
            mass_of[int(text)] = mass_of.get(int(text), 0.0) + prob
    one = mass_of.pop(1, 0.0)
    if one:
        mass_of[1] = one * (1.0 - zero_after_one)
        mass_of[10] = mass_of.get(10, 0.0) + one * zero_after_one
    mass = sum(mass_of.values())
    if mass < min_mass or mass <= 0:
        return None, mass
    return sum(r * p for r, p in mass_of.items()) / mass, mass


def _distribution_ratings(sampler: tinker.SamplingClient, renderer: object, judge_model: str,
                          requests: list[str], min_mass: float) -> list[float | None]:
    """The expected 1-10 rating of each filled-in rubric under the judge's next-token distribution (all in flight)."""
    one, zero = (renderer.tokenizer.encode(d, add_special_tokens=False) for d in ("1", "0"))
    if len(one) != 1 or len(zero) != 1:
        raise ValueError(f"judge {judge_model!r} does not spell numbers digit by digit; use judge_scoring=text")
    futures = []
    for text in requests:
        prefix = renderer.build_generation_prompt([{"role": "user", "content": text}], prefill=RATING_PREFILL).to_ints()
        # prompt logprobs of prefix + "1" "0": top-k at the first answer position, and P("0" | "1")
        futures.append((len(prefix), sampler.sample(
            tinker.ModelInput.from_ints(prefix + one + zero), 1, tinker.SamplingParams(max_tokens=1),
            include_prompt_logprobs=True, topk_prompt_logprobs=20)))
    ratings = []
    for position, future in futures:
        response = future.result()
        first: dict[str, float] = {}
        for token, logprob in response.topk_prompt_logprobs[position] or []:
            word = renderer.tokenizer.decode([token])
            first[word] = first.get(word, 0.0) + math.exp(logprob)
        rating, _ = rating_from_distribution(first, math.exp(response.prompt_logprobs[position + 1]), min_mass)
        ratings.append(rating)
    return ratings


def rubric_ratings(service_client: tinker.ServiceClient, judge_model: str, rubric: str,
                   items: list[tuple[str, str]], min_mass: float = 0.5) -> list[float]:
    """The judge's expected 1-10 rating of each (prompt, response) under `rubric`, from its next-token
    distribution; NaN where less than `min_mass` of the probability fell on the ratings. Uncached: used by the
    evaluation, whose own folder is the cache."""
    renderer = rendering.get_renderer(judge_model)
    sampler = service_client.create_sampling_client(base_model=judge_model).result()
    ratings = _distribution_ratings(sampler, renderer, judge_model,
                                    [rubric.format(prompt=p, response=r) for p, r in items], min_mass)
    return [float("nan") if r is None else float(r) for r in ratings]


def judge_ratings(service_client: tinker.ServiceClient, judge_model: str, rubric: str, prompts: list[dict],
                  candidates: dict[str, list[dict]], config: PairsConfig, cache: StageCache, stage: str
                  ) -> tuple[dict[str, list[float]], int]:
    """The judge's 1-10 rating of every candidate under `rubric` (NaN where it gave none).

    `distribution` scoring reads the expected rating off the judge's next-token distribution (one request per
    candidate; no rating when less than `judge_min_mass` falls on the numbers); `text` scoring samples a reply
    and parses its first 1-10 number, asking again (another seed) up to `judge_retries` times. Returns the
    ratings and the count of candidates left without one."""
    by_id = {p["prompt_id"]: p for p in prompts}
    out: dict[str, list[float]] = {}
    todo: list[tuple[str, str, int]] = []
    for prompt_id, pool in candidates.items():
        key = cache.key(stage, judge_model, rubric, config.judge_scoring, config.judge_min_mass,
                        by_id[prompt_id]["prompt"], [c["text"] for c in pool])
        cached = cache.get(stage, key)
        if cached is not None:
            out[prompt_id] = cached
        else:
            out[prompt_id] = [float("nan")] * len(pool)
            todo.extend((prompt_id, key, i) for i in range(len(pool)))
    if not todo:
        return out, sum(math.isnan(v) for values in out.values() for v in values)
    renderer = rendering.get_renderer(judge_model)
    sampler = service_client.create_sampling_client(base_model=judge_model).result()

    def judge_input(prompt_id: str, index: int, prefill: str | None = None) -> tinker.ModelInput:
        text = rubric.format(prompt=by_id[prompt_id]["prompt"], response=candidates[prompt_id][index]["text"])
        return renderer.build_generation_prompt([{"role": "user", "content": text}], prefill=prefill)

    if config.judge_scoring == "distribution":
        ratings = _distribution_ratings(sampler, renderer, judge_model, [
            (rubric.format(prompt=by_id[prompt_id]["prompt"], response=candidates[prompt_id][index]["text"]))
            for prompt_id, _, index in todo], config.judge_min_mass)
        for (prompt_id, _, index), rating in zip(todo, ratings):
            if rating is not None:
                out[prompt_id][index] = rating
    else:
        stop = renderer.get_stop_sequences()
        remaining = list(todo)
        for attempt in range(config.judge_retries):
            futures = [sampler.sample(judge_input(prompt_id, index), 1, tinker.SamplingParams(
                max_tokens=8, temperature=0.0 if attempt == 0 else 0.7, seed=attempt, stop=stop))
                for prompt_id, _, index in remaining]
            still = []
            for (prompt_id, key, index), future in zip(remaining, futures):
                tokens = list(future.result().sequences[0].tokens)
                reply = renderer.tokenizer.decode(tokens, skip_special_tokens=True)
                rating = parse_rating(reply)
                if rating is None:
                    still.append((prompt_id, key, index))
                else:
                    out[prompt_id][index] = rating
            remaining = still
            if not remaining:
                break
    for prompt_id, key in {(p, k) for p, k, _ in todo}:
        cache.put(stage, key, out[prompt_id])
    return out, sum(math.isnan(v) for values in out.values() for v in values)
