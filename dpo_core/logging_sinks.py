"""Metric sinks beside metrics.jsonl: the console progress bar and W&B (a no-op when no project is set)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpo_core.config import TrainConfig
from dpo_core.settings import Settings


class ConsoleProgress:
    """One progress line per step: step, loss, accuracy."""

    def __init__(self, total: int | None = None):
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._bar.total is None and metrics.get("progress"):
            self._bar.total = round((step + 1) / metrics["progress"])
        self._bar.n = step + 1
        self._bar.set_postfix(loss=f"{metrics.get('dpo_loss', float('nan')):.4f}",
                              acc=f"{metrics.get('accuracy', float('nan')):.2f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class WandbSink:
    """Per-step metrics and the config (never a secret) to a W&B run; works with WANDB_MODE=offline."""

    def __init__(self, config: TrainConfig, settings: Settings, project: str, name: str, run_dir: Path):
        import wandb

        entity, project = wandb_target(project, settings.wandb_entity)
        self._run = wandb.init(
            project=project, entity=entity, name=name, dir=str(run_dir),
            mode=settings.wandb_mode, config=config.model_dump(mode="json"),
            reinit="create_new",  # experiments trained at once in one process each keep their own run
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        self._run.finish()


def wandb_target(project: str, entity: str | None = None) -> tuple[str | None, str]:
    """(entity, project) as the guide writes them: `team-name/cs329x-dpo` is project `cs329x-dpo` of the team
    `team-name` (wandb.init refuses a `/` in a project name); a bare name uses `entity` (DPO_WANDB_ENTITY) or
    the logged-in user's default."""
    team, slash, name = project.rpartition("/")
    if slash and team and name:
        return team, name
    return entity, project


@contextlib.contextmanager
def build_sinks(config: TrainConfig, settings: Settings, run_dir: Path) -> Iterator[list]:
    """Console always; W&B when a project is named by the run (`wandb_project`) or the process
    (`DPO_WANDB_PROJECT`), the run named `wandb_name` or else after its folder."""
    sinks: list[Any] = [ConsoleProgress()]
    project = config.wandb_project or settings.wandb_project
    if project:
        sinks.append(WandbSink(config, settings, project, config.wandb_name or run_dir.name, run_dir))
    try:
        yield sinks
    finally:
        for sink in sinks:
            sink.close()


def log_report(report_md: str | Path, run_dirs: list[str], settings: Settings) -> str | None:
    """The report beyond training curves, to W&B when a project is named (by the experiments' `wandb_project`,
    else DPO_WANDB_PROJECT): the evaluation's findings table (table.csv: one row per evaluated model, every
    metric with its CI) and the report's plots, as one run of job_type "report" named after the report folder.
    Returns the W&B run's folder, or None without a project."""
    from dpo_core.records import RunConfig

    configs = [RunConfig.read_train_config(run_dir) for run_dir in run_dirs]
    project = next((c.wandb_project for c in configs if c.wandb_project), None) or settings.wandb_project
    if not project:
        return None
    import pandas as pd
    import wandb

    folder = Path(report_md).parent
    # "create_new": a W&B run of a training experiment may still be open in this process (suite threads).
    run = wandb.init(project=project, entity=settings.wandb_entity, name=f"report-{folder.name}", job_type="report",
                     dir=str(folder), mode=settings.wandb_mode, reinit="create_new")
    try:
        logged: dict[str, Any] = {"findings": wandb.Table(dataframe=pd.read_csv(folder / "table.csv"))}
        logged.update({f"plots/{png.stem}": wandb.Image(str(png)) for png in sorted(folder.glob("*.png"))})
        run.log(logged)
        return str(Path(run.dir).parent)
    finally:
        run.finish()

