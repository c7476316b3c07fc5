"""docs/quickstart.md as a user follows it: every block marked runnable runs as written, from a checkout, offline.

The harness (tests/helpers/runnable_docs.py) takes any Markdown file; point it at README.md the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.runnable_docs import DocRunner, runnable_blocks, user_checkout, user_environment

ROOT = Path(__file__).resolve().parents[2]
BLOCK_TIMEOUT_S = 1200  # one block; the slowest (the quick suite) took ~6 min under a load average of 9-13


def run_markdown(path: Path, tmp_path: Path) -> Path:
    """Run every runnable block of `path` in order; fail on the first that does not exit 0. Returns the checkout."""
    blocks = runnable_blocks(path.read_text())
    assert blocks, f"{path} marks no block runnable"
    checkout = user_checkout(ROOT, tmp_path / "checkout")
    with DocRunner(checkout, user_environment(tmp_path), tmp_path / "logs") as runner:
        for block in blocks:
            done = runner.run(block, BLOCK_TIMEOUT_S)
            assert done.returncode == 0, (f"{path.name} line {block.line} failed ({done.returncode}):\n{block.code}\n"
                                          f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
    return checkout


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.minutes(9)
def test_quickstart_runs_as_written(tmp_path):
    checkout = run_markdown(ROOT / "docs" / "quickstart.md", tmp_path)

    first = checkout / "experiments" / "first-run"
    assert _rows(first / "checkpoints.jsonl")[-1]["name"] == "final"
    assert len(_rows(first / "metrics.jsonl")) == 16  # 126 trained pairs at batch 8, as the page says
    assert (checkout / "reports" / "first-run" / "report.md").is_file()
    assert (checkout / "reports" / "quick" / "report.md").is_file()
    rehearsal = checkout / "experiments" / "rehearsal"
    config = json.loads((rehearsal / "config.json").read_text())
    assert config["train_config"]["model_name"] == "Qwen/Qwen3-8B"
    assert config["renderer_name"] == "qwen3_disable_thinking"  # the tinker path's renderer, offline
    assert _rows(rehearsal / "checkpoints.jsonl")[-1]["sampler_path"].startswith("tinker://")
    assert not (ROOT / "experiments" / "first-run").exists()  # everything was written in the user's checkout
