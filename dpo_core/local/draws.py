"""The decoder's sampling op and its randomness: one vectorised draw per step for every row.

The token is an inverse-CDF draw of each row's filtered distribution at a uniform that a counter-based generator
derives from (row seed, step) alone, so a row's tokens depend on nothing else in its batch.
"""

from __future__ import annotations

import numpy as np
import torch

GREEDY_INV_TEMPERATURE = 1e6  # temperature 0 reports logprobs of the distribution at temperature 1e-6


# ----------------------------------------------------------------------------------------------
# Randomness: a counter-based generator
# ----------------------------------------------------------------------------------------------

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 arrays (wrap-around arithmetic)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def counter_uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Uniform draws in (0, 1), one per (row seed, step), each a pure function of its key.

    A counter-based generator: no state is carried from one draw to the next, so a row's draws are the same
    whichever rows share its batch and whenever it joined. Sample i of a request with seed s has the row seed
    s + i (the wire's documented rule), so it equals sample 0 of the same request with seed s + i.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.asarray(seeds, dtype=np.uint64)) ^ np.asarray(steps, dtype=np.uint64))
    return ((key >> _U64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def row_seed(seed: int, sample: int) -> int:
    """Sample `sample`'s seed as the generator's 64-bit key: seed + sample (negative seeds wrap)."""
    return (int(seed) + int(sample)) & ((1 << 64) - 1)


# ----------------------------------------------------------------------------------------------
# The sampling op
# ----------------------------------------------------------------------------------------------


def filter_logprobs(log_probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask tokens outside top-k / the top-p nucleus (to -inf), every row at once."""
    if top_k is not None and 0 < top_k < log_probs.shape[-1]:
        kth = torch.topk(log_probs, top_k, dim=-1).values[..., -1:]
        log_probs = log_probs.masked_fill(log_probs < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_lp, order = torch.sort(log_probs, descending=True, dim=-1)
        cumulative = sorted_lp.exp().cumsum(dim=-1)
        remove = cumulative - sorted_lp.exp() > top_p  # keep the token that crosses top_p
        sorted_lp = sorted_lp.masked_fill(remove, float("-inf"))
        log_probs = torch.full_like(log_probs, float("-inf")).scatter(-1, order, sorted_lp)
    return log_probs


def sample_tokens(logits: torch.Tensor, inv_temperature: torch.Tensor, uniforms: torch.Tensor,
                  greedy: torch.Tensor | None, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: (tokens [R], their logprobs [R]) from fp32 logits [R, V].

    Inverse-CDF sampling of the filtered distribution at each row's temperature, with each row's own uniform;
    `greedy` rows take the argmax. The logprob is the token's under the temperature-scaled, unfiltered
    distribution (what Tinker reports); NaN for a row whose logits are not finite.
    """
    scaled = logits * inv_temperature[:, None]
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_probs = scaled - log_norm
    filtered = filter_logprobs(log_probs, top_k, top_p)
    cdf = filtered.exp().cumsum_(dim=-1)
    targets = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    if greedy is not None:
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    chosen = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
    chosen = torch.where(torch.isfinite(log_norm.squeeze(-1)), chosen, torch.full_like(chosen, float("nan")))
    return tokens, chosen


def stop_hits(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Which rows sampled one of their stop token ids (stop_ids [R, S], padded with -1)."""
    if stop_ids.shape[1] == 0:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return (tokens[:, None] == stop_ids).any(dim=-1)


def stop_string_end(decode, tokens: list[int], checked: int, limit: int, stops: tuple[str, ...]) -> int | None:
    """The number of tokens up to and including the one that completes a stop string in tokens[:limit], or None;
    tokens[:checked] are known to hold none.

    Searches a decoded tail that reaches back more than the longest stop string's length before the tokens not
    yet searched, so a string of any length is found wherever it ends.
    """
    reach = max(len(s) for s in stops) + 8
    if limit <= checked:
        return None
    start = max(0, checked - reach)
    while start > 0 and len(decode(tokens[start:checked])) < reach:
        start = max(0, start - reach)
    if not any(s in decode(tokens[start:limit]) for s in stops):
        return None
    low, high = checked + 1, limit  # the shortest prefix that holds a stop string
    while low < high:
        middle = (low + high) // 2
        if any(s in decode(tokens[start:middle]) for s in stops):
            high = middle
        else:
            low = middle + 1
    return low
