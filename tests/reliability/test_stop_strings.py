"""Issue 26 item 2: a stop string of any allowed length (up to 256 characters) stops the sample where it ends.

The sampler used to search only the decoded last 32 tokens, so a stop string spanning more tokens never matched
and the sample ran to max_tokens. Driven through the real tinker SDK against the local server on local/tiny,
whose seeded output is reproducible: the test reads a seeded continuation, takes a 256-character stretch of it as
the stop string, and asks for the same continuation again with that stop.
"""

from __future__ import annotations

import pytest
import tinker

from dpo_core import rendering
from dpo_core.local.validation import MAX_STOP_CHARS

TINY = "local/tiny"
PROMPT = [{"role": "user", "content": "Write a long story."}]


@pytest.fixture(scope="module")
def tokenizer(registered):
    return rendering.get_renderer(TINY).tokenizer


def _seeded(sampler, prompt, stop, max_tokens=200) -> tinker.SampledSequence:
    params = tinker.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=3, stop=stop)
    return sampler.sample(prompt, 1, params).result().sequences[0]


def _stop_string_ending_at(tokenizer, tokens: list[int], chars: int) -> tuple[str, int]:
    """A `chars`-long stretch of the text that ends with token n (n as small as possible past `chars`
    characters), and n: the text of tokens[:n] must be a prefix of the whole text (no split character)."""
    text = tokenizer.decode(tokens)
    for n in range(1, len(tokens)):
        prefix = tokenizer.decode(tokens[:n])
        if len(prefix) >= chars + 50 and text.startswith(prefix) and "\ufffd" not in prefix[-chars:]:
            needle = prefix[-chars:]
            if needle not in tokenizer.decode(tokens[:n - 1]):
                return needle, n
    raise AssertionError("the continuation is too short for the test")


def test_a_256_character_stop_string_stops_the_sample_where_it_ends(service_client, tokenizer):
    assert MAX_STOP_CHARS == 256  # the wire's limit: the longest stop string a client may send
    sampler = service_client.create_sampling_client(base_model=TINY).result()
    prompt = rendering.get_renderer(TINY).build_generation_prompt(PROMPT)
    free = _seeded(sampler, prompt, stop=[])
    needle, end = _stop_string_ending_at(tokenizer, free.tokens, MAX_STOP_CHARS)
    # What made the old search miss it: the string spans more than the 32 tokens it decoded.
    assert needle not in tokenizer.decode(free.tokens[end - 32:end])

    stopped = _seeded(sampler, prompt, stop=[needle])
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == free.tokens[:end]  # ends on the token that completes the string, not later
    assert tokenizer.decode(stopped.tokens).endswith(needle)


def test_long_stop_strings_stop_each_sample_of_a_batch_at_its_own_place(service_client, tokenizer):
    """Several samples (temperature 1, one request) each stop at their own 200-character string's end, while
    batch-mates without a match run on: the check is per row."""
    sampler = service_client.create_sampling_client(base_model=TINY).result()
    prompt = rendering.get_renderer(TINY).build_generation_prompt(PROMPT)
    params = tinker.SamplingParams(max_tokens=120, temperature=1.0, seed=7, stop=[])
    free = sampler.sample(prompt, 3, params).result().sequences
    needle, end = _stop_string_ending_at(tokenizer, free[1].tokens, 200)
    stopped = sampler.sample(prompt, 3, tinker.SamplingParams(max_tokens=120, temperature=1.0, seed=7,
                                                              stop=[needle])).result().sequences
    assert stopped[1].tokens == free[1].tokens[:end] and stopped[1].stop_reason == "stop"
    for other, original in ((stopped[0], free[0]), (stopped[2], free[2])):
        if needle not in tokenizer.decode(original.tokens):
            assert other.tokens == original.tokens and other.stop_reason == "length"
