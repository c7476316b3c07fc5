"""With 20% of requests failing transiently, training and evaluation end exactly where clean runs end."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import tinker

from dpo_core import data, diversity
from dpo_core.checkpoints import final_record, read_jsonl
from dpo_core.config import EvalConfig, TrainConfig
from dpo_core.evaluate import EvalTarget, sample_and_score, select_prompts
from dpo_core.local.launcher import local_server
from dpo_core.settings import Settings
from dpo_core.train import train

DATA = Path(__file__).resolve().parents[2] / "data"


def _run(tmp_path: Path, name: str, fault_rate: float, registered: Path, embedder) -> tuple[list, pd.DataFrame]:
    path = data.resolve_dataset(2, DATA)
    pairs = data.load_pairs(path)[:8]
    config = TrainConfig(model_name="local/tiny", dataset=2, batch_size=4, num_epochs=2, learning_rate=2e-3,
                         max_length=96, lr_schedule="constant")
    settings = Settings(cache_dir=registered, local_storage=tmp_path / name / "storage")
    with local_server(settings, fault_rate=fault_rate, fault_seed=11) as server:
        with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as client:
            train(config, client, pairs, run_dir=tmp_path / name / "run", dataset_path=str(path),
                  dataset_hash=data.content_hash(path), reference_dir=tmp_path / name / "ref")
            eval_config = EvalConfig(num_samples=2, max_prompts=3, max_tokens=6)
            prompts = select_prompts(data.load_eval_prompts(DATA / "eval_prompts.parquet"), eval_config)
            sampler_path = final_record(tmp_path / name / "run").sampler_path
            sample_and_score(client, EvalTarget(name, "local/tiny", sampler_path), prompts, eval_config, embedder,
                             tmp_path / name / "eval", progress=False)
            if fault_rate:
                assert server.app.state.fault_counts["injected"] > 0
    metrics = [m["dpo_loss"] for m in read_jsonl(tmp_path / name / "run" / "metrics.jsonl")]
    return metrics, pd.read_parquet(tmp_path / name / "eval" / "scores.parquet")


def test_twenty_percent_faults_change_nothing(tmp_path, registered):
    embedder = diversity.Embedder()
    clean_metrics, clean_scores = _run(tmp_path, "clean", 0.0, registered, embedder)
    faulty_metrics, faulty_scores = _run(tmp_path, "faulty", 0.2, registered, embedder)
    assert faulty_metrics == pytest.approx(clean_metrics, abs=1e-5)
    pd.testing.assert_frame_equal(clean_scores, faulty_scores, atol=1e-6)
