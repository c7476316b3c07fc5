"""Export a run's trained adapter for serving elsewhere: a PEFT adapter folder or a merged HF model.

The weights come through the SDK's own download route, the same on Tinker and on the local server: the run's
training checkpoint (`state_path`) is loaded into a training client, exported with `save_weights_external`, and its
files fetched from the signed URLs of `RestClient.get_external_weights_urls`; the temporary export is deleted
afterwards. tinker-cookbook's `weights` module then converts them: `build_lora_adapter` (PEFT layout, for vLLM /
SGLang / peft) or `build_hf_model` (LoRA merged into the base weights). The tokenizer files are written beside.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from dpo_core.backend import base_model_dir
from dpo_core.checkpoints import read_checkpoints
from dpo_core.records import RunConfig
from dpo_core.settings import Settings

ExportFormat = Literal["peft", "merged"]


class ExportError(ValueError):
    """A run or checkpoint that cannot be exported; the message says which and what to do."""


def checkpoint_state_path(run_dir: Path, step: str = "final") -> tuple[str, str]:
    """(name, state_path) of the run's checkpoint `step`: `final`, a checkpoint name (`000020`) or a step number."""
    records = [r for r in read_checkpoints(run_dir) if r.state_path]
    if not records:
        raise ExportError(f"{run_dir}: no checkpoint in checkpoints.jsonl (train the run first)")
    for record in records:
        if record.name == step or (step.isdigit() and record.step == int(step)):
            return record.name, record.state_path
    names = ", ".join(r.name for r in records)
    raise ExportError(f"{run_dir}: no checkpoint {step!r}; it has {names}")


def download_adapter(service_client: Any, state_path: str, out_dir: Path) -> Path:
    """The checkpoint's LoRA adapter (adapter_model.safetensors + adapter_config.json, Tinker's export layout) in
    `out_dir`, through save_weights_external and its signed download URLs."""
    from tinker_cookbook.weights._download import _download_external_weights

    training_client = service_client.create_training_client_from_state(state_path).result()
    export_path = training_client.save_weights_external(f"export-{int(time.time() * 1000) % 10**9}").result().path
    with warnings.catch_warnings():  # deprecated in 0.38 for RestClient(base_url, api_key): same session, same key
        warnings.simplefilter("ignore", FutureWarning)
        rest = service_client.create_rest_client()
    try:
        # The cookbook's downloader: re-signs expiring URLs, refuses unsafe paths, stages then moves.
        _download_external_weights(rest, export_path, Path(out_dir))
    finally:
        try:
            rest.delete_checkpoint_from_tinker_path(export_path).result()
        except Exception:  # the export expires by itself; the files are already here
            pass
    return Path(out_dir)


def save_tokenizer(model_name: str, settings: Settings, out_dir: Path) -> None:
    """The base model's tokenizer files, so the folder serves on its own."""
    from dpo_core import models

    if model_name in models.model_specs(settings.local_models):
        folder = models.tokenizer_dir(model_name, Path(settings.cache_dir), settings.local_models)
        for file in Path(folder).iterdir():
            if file.is_file() and (file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                                   or file.name in ("chat_template.jinja", "added_tokens.json")):
                shutil.copy2(file, out_dir / file.name)
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_name).save_pretrained(str(out_dir))


def export_run(run_dir: Path, out_dir: Path, service_client: Any, settings: Settings, step: str = "final",
               fmt: ExportFormat = "peft", base_model_path: str | None = None) -> Path:
    """Write the run's checkpoint `step` to `out_dir` (which must not exist) as a PEFT adapter or a merged model.
    `base_model_path`: a local folder of the base model (config.json + safetensors) instead of the HF cache's."""
    from tinker_cookbook import weights

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists; choose a new --out folder")
    run = RunConfig.read(run_dir)
    model_name = run.train_config.model_name
    name, state_path = checkpoint_state_path(run_dir, step)
    base = base_model_path or base_model_dir(model_name, settings)
    with tempfile.TemporaryDirectory(prefix="dpo-export-") as tmp:
        adapter = download_adapter(service_client, state_path, Path(tmp) / "adapter")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "peft":
            weights.build_lora_adapter(base_model=base, adapter_path=str(adapter), output_path=str(out_dir))
            config_file = out_dir / "adapter_config.json"
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = model_name  # the model's name, not this machine's cache folder
            config_file.write_text(json.dumps(config, indent=2) + "\n")
        else:
            weights.build_hf_model(base_model=base, adapter_path=str(adapter), output_path=str(out_dir),
                                   dtype="float32")
    save_tokenizer(model_name, settings, out_dir)
    (out_dir / "dpo_export.json").write_text(json.dumps({
        "run": str(run_dir), "checkpoint": name, "state_path": state_path, "base_model": model_name,
        "format": fmt, "renderer_name": run.renderer_name}, indent=2) + "\n")
    return out_dir
