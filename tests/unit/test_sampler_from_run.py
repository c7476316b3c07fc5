"""`Sampler.from_run(run_dir)`: inference on a trained run, prompted exactly as its training rendered."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_core import data, dataset_checks, rendering
from dpo_core.checkpoints import final_record
from dpo_core.config import TrainConfig
from dpo_core.sampling import Sampler, TinkerSampler
from dpo_core.train import train

DATA = Path(__file__).resolve().parents[2] / "data"
TINY = "local/tiny"
PROMPT = [{"role": "user", "content": "Write a short poem about the ocean."}]

pytestmark = pytest.mark.slow  # a local server and a short training run


@pytest.fixture(scope="module")
def run_dir(service_client, tmp_path_factory) -> Path:
    """A finished 2-step run of local/tiny rendered with `role_colon`, not the model's own default renderer."""
    path = data.resolve_dataset(1, DATA)
    pairs, _ = dataset_checks.validate(path)
    folder = tmp_path_factory.mktemp("from-run") / "run"
    config = TrainConfig(model_name=TINY, dataset=1, batch_size=4, num_epochs=1, max_length=128,
                         learning_rate=1e-2, renderer_name="role_colon", held_out_fraction=0, allow_few_steps=True)
    train(config, service_client, pairs[:8], run_dir=folder, dataset_path=str(path),
          dataset_hash=data.content_hash(path), reference_dir=folder.parent / "ref")
    return folder


def test_from_run_samples_the_final_checkpoint_with_the_runs_renderer(run_dir, service_client):
    assert rendering.renderer_name_for(TINY) != "role_colon"  # else this test could not tell them apart
    sampler = Sampler.from_run(run_dir, temperature=1.0, max_tokens=8, seed=3, service_client=service_client)
    assert (sampler.model_name, sampler.renderer_name) == (TINY, "role_colon")
    assert sampler.model_path == final_record(run_dir).sampler_path

    [[completion]] = sampler.sample_many([PROMPT])
    # The prompt is the one training rendered: every token before the first trained (weighted) token.
    tokens, weights = rendering.render_pair_tokens(rendering.get_renderer(TINY, "role_colon"), PROMPT,
                                                   [{"role": "assistant", "content": "Waves."}])
    assert completion.prompt_tokens == tokens[:next(i for i, w in enumerate(weights) if w > 0)]
    default_prompt = Sampler(TINY, service_client=service_client)._prompt(PROMPT).to_ints()
    assert completion.prompt_tokens != default_prompt

    # The same samples as a Sampler built by hand from the run's files: same weights, renderer and seed.
    by_hand = TinkerSampler(TINY, final_record(run_dir).sampler_path, temperature=1.0, max_tokens=8, seed=3,
                            renderer_name="role_colon", service_client=service_client)
    assert by_hand.complete(PROMPT) == completion.text


def test_from_run_names_what_a_run_lacks(run_dir, tmp_path, service_client):
    with pytest.raises(FileNotFoundError, match="has no checkpoint '000099'.*it has: final"):
        Sampler.from_run(run_dir, checkpoint="000099", service_client=service_client)
    with pytest.raises(FileNotFoundError, match="not an experiment folder"):
        Sampler.from_run(tmp_path, service_client=service_client)
