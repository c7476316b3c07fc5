"""The report's findings table and plots reach W&B (offline mode) when the experiments name a project."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dpo_core.config import TrainConfig
from dpo_core.logging_sinks import log_report
from dpo_core.settings import Settings


def _experiment(folder: Path, project: str | None) -> str:
    folder.mkdir(parents=True)
    config = TrainConfig(model_name="local/tiny", dataset=2, wandb_project=project)
    (folder / "config.json").write_text(json.dumps({"train_config": config.model_dump(mode="json")}))
    return str(folder)


def _report(folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True)
    pd.DataFrame({"label": ["local/tiny (base)", "dataset2_tiny"], "distinct_2/overall": [0.41, 0.47]}).to_csv(
        folder / "table.csv", index=False)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0.41, 0.47])
    fig.savefig(folder / "diversity_vs_creativity.png")
    plt.close(fig)
    (folder / "report.md").write_text("# report\n")
    return folder / "report.md"


def test_findings_table_and_plots_are_logged_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    report_md = _report(tmp_path / "report")
    run_dir = _experiment(tmp_path / "experiments" / "dataset2_tiny", project="cs329x-dpo")

    wandb_dir = log_report(report_md, [run_dir], Settings(wandb_mode="offline"))

    assert wandb_dir is not None
    media = {p.relative_to(wandb_dir).as_posix() for p in Path(wandb_dir).rglob("*") if p.is_file()}
    table_files = [m for m in media if "findings" in m and m.endswith(".table.json")]
    assert table_files and any("plots/diversity_vs_creativity" in m and m.endswith(".png") for m in media), media
    table = json.loads((Path(wandb_dir) / table_files[0]).read_text())
    assert table["columns"] == ["label", "distinct_2/overall"] and table["data"][1] == ["dataset2_tiny", 0.47]
    # W&B's offline writer is its own process: finish() returns once it has the records, and on a loaded machine
    # the .wandb file can still hold only its header for a moment. Wait for the records, not for a time.
    import time

    deadline = time.monotonic() + 120
    log = next(Path(wandb_dir).rglob("*.wandb")).read_bytes()
    while not (b"cs329x-dpo" in log and b"report-report" in log) and time.monotonic() < deadline:
        time.sleep(0.5)
        log = next(Path(wandb_dir).rglob("*.wandb")).read_bytes()
    assert b"cs329x-dpo" in log and b"report-report" in log, log[:200]


def test_no_project_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("DPO_WANDB_PROJECT", raising=False)
    report_md = _report(tmp_path / "report")
    run_dir = _experiment(tmp_path / "experiments" / "dataset2_tiny", project=None)
    assert log_report(report_md, [run_dir], Settings(wandb_mode="offline")) is None
    assert not (tmp_path / "report" / "wandb").exists()
