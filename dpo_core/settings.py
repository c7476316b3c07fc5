"""Process-level settings: which backend, where data and runs live, W&B, local-server knobs.

Built by entry points (`Settings()`), then passed down; nothing here runs at import time.
Values come from, in order: explicit arguments, environment variables, a `.env` file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Set in every process the project starts: no telemetry, no advisory noise, no tokenizer thread pools.
HYGIENE_ENV = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TINKER_TELEMETRY": "0",
    # torch's OpenMP threads sleep instead of spinning while they wait for each other. On a shared or loaded CPU
    # spinning threads steal the cores the working ones need: bench/omp_wait.py measured a SmolLM2 decode
    # workload at 0.26x the default's wall with PASSIVE (2 vCPUs, load 2.5-4). Read when torch starts, so it
    # must be set before torch is imported; an explicit OMP_WAIT_POLICY wins.
    "OMP_WAIT_POLICY": "PASSIVE",
}
# Only where the local backend runs: its models are local folders, and HF libraries otherwise reach for the hub
# in the background. Never on the tinker path: there the client loads tokenizers by HF repo id (Qwen/Qwen3-8B),
# which an offline hub refuses unless that exact revision happens to be cached.
LOCAL_ONLY_ENV = {"HF_HUB_OFFLINE": "1"}
OFFLINE_ENV = {**LOCAL_ONLY_ENV, **HYGIENE_ENV}  # the local backend's full set


def apply_offline_env(settings: Settings | None = None) -> None:
    """Set the hygiene variables in this process, plus HF_HUB_OFFLINE unless `settings` resolve to the tinker
    backend (existing values win). Without settings the caller is a local-backend process (the server, benches).
    Call it before huggingface_hub is imported: the hub reads HF_HUB_OFFLINE once, on import."""
    tinker_path = settings is not None and settings.resolved_backend() == "tinker"
    for key, value in (HYGIENE_ENV if tinker_path else OFFLINE_ENV).items():
        os.environ.setdefault(key, value)


def install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C: the in-process local server and Prefect's temporary server are shut down by
    their context managers and exit hooks (a default SIGTERM would kill this process and orphan the latter).
    Run folders stay resumable: every line is flushed as written, and a rerun continues from the registry."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dpo-suite, else ~/.cache/dpo-suite"""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpo-suite"


class Settings(BaseSettings):
    """Settings for one process. Secrets are SecretStr and never serialised."""

    model_config = SettingsConfigDict(
        env_prefix="DPO_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True,
        use_attribute_docstrings=True,  # a field's docstring is its description in docs/configuration.md
    )

    # --- backend ---
    backend: Literal["auto", "tinker", "local"] = "auto"
    """auto: Tinker when a TINKER_API_KEY is set, else the local server; tinker; local."""
    tinker_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("TINKER_API_KEY", "DPO_TINKER_API_KEY")
    )
    """Tinker API key (tml-...); selects Tinker under backend auto. Never written to a file, log or W&B."""
    tinker_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("TINKER_BASE_URL", "DPO_TINKER_BASE_URL")
    )
    """The Tinker service's URL; point it at a local server or the stand-in to rehearse the tinker path."""

    # --- folders ---
    data_dir: Path = Path("data")
    """Folder of the numbered datasets and the eval prompts."""
    experiments_dir: Path = Path("experiments")
    """Folder the run folders are created in."""
    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Converted model weights, tokenizers, reference logprobs and pair-building stages."""
    local_storage: Path = Path(".dpo_local")
    """The local server's checkpoint folder (its tinker:// paths point into it)."""

    # --- local server ---
    local_host: str = "127.0.0.1"
    """Address the local server binds; anything but loopback needs an API key the operator chose."""
    local_port: int = 0
    """The local server's port; 0 = a free one."""
    local_threads: int = 0
    """torch threads of the local server; 0 = 1 for tiny models, 2 otherwise (measured best on 2 vCPUs)."""
    local_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the local server computes: auto = CUDA when available, else the CPU."""
    local_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = bfloat16 on CUDA (half the memory), float32 on the CPU (no fast bf16 kernels there)."""
    local_micro_batch_tokens: int = 4096
    """Tokens per forward/backward micro-batch: bounds memory; gradients accumulate over micro-batches."""
    local_graph_cache_tokens: int = 16384
    """Tokens whose autograd graph is kept between a forward and its backward."""
    local_recompute_layers: float = Field(default=0.25, ge=0, le=1)
    """Share of decoder layers that keep only their input and recompute the rest in the backward (0 = fastest,
    most memory; 1 = least memory).
    """
    local_mmap_threshold_bytes: int = Field(default=128 * 1024, ge=0)
    """glibc only: allocations of this many bytes or more are mmapped, so freed activations leave the process's
    memory; 0 = off.
    """
    local_models: dict[str, Path] = {}
    """Extra base models of the local server, as JSON: {"NAME": "/path/to/hf/model/folder"}."""
    local_fault_rate: float = 0.0
    """Answer this fraction of requests with a transient 429/5xx (for reliability tests)."""
    local_stand_in: Literal["", "tinker"] = ""
    """tinker: answer like Tinker (its lineup; Qwen/Qwen3-8B on a tiny random-init model with the real tokenizer)
    to rehearse a cloud run offline; empty: serve the local models.
    """
    # Server limits (docs/local-server.md, "Limits"): what one request or client may ask of the local server.
    # The largest valid forward_backward body (1,048,576 tokens) is ~17 MB, and decoding costs up to ~3x the body.
    local_max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    """Largest forward_backward (protobuf) body the local server accepts, counted after decompression."""
    # The largest valid JSON body, a 32K-token prompt, is ~0.26 MB; decoding JSON costs up to ~35x its size in one
    # call that holds the GIL (4 MiB took over a second on a loaded machine).
    local_max_json_body_bytes: int = Field(default=1024 * 1024, ge=1)
    """Largest JSON request body the local server accepts."""
    local_max_large_bodies: int = Field(default=2, ge=1)
    """Bodies over 256 KiB read and decoded at once; more wait, then get 429."""
    # A batch of 256 sampled rows x 128 tokens (dpo-pairs) takes ~9 min on 2 idle vCPUs and over 10 under load:
    # 600 s failed the documented regeneration.
    local_request_timeout_s: float = Field(default=3600.0, gt=0)
    """Time budget of one engine job, from its start; decoding stops at the next step."""
    local_max_training_models: int = Field(default=16, ge=0)
    """Live LoRA training models, all clients together; 0 = no cap."""
    local_max_sessions: int = Field(default=1024, ge=1)
    """Live client sessions."""
    local_session_idle_s: float = Field(default=900.0, gt=0)
    """A session without a heartbeat this long is closed, and its models and samplers freed."""
    # Snapshot samplers (save_weights_and_get_sampling_client) each hold a copy of the adapter (SmolLM2 rank 32:
    # ~40 MB); the least recently used go first past either cap.
    local_max_snapshots: int = Field(default=32, ge=1)
    """Snapshot samplers (save_weights_and_get_sampling_client) kept by the server; least recently used go first."""
    local_max_snapshots_per_session: int = Field(default=8, ge=1)
    """Snapshot samplers kept per client session; least recently used go first."""

    # --- cost estimate (dry_run=true) ---
    price_table: dict[str, dict[str, float]] = {}
    """USD per million tokens by model, for the dry run's cost estimate, as JSON: {"Qwen/Qwen3-8B": {"prefill": 0.2,
    "sample": 0.6, "train": 0.6}}; empty = no estimate (copy the prices from your provider's price page).
    """

    # --- Weights & Biases ---
    wandb_project: str | None = None
    """Default W&B project of runs that name none (wandb_project=...)."""
    wandb_entity: str | None = None
    """W&B entity (team or user)."""
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode: online, offline or disabled; none = W&B's own default."""
    wandb_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("WANDB_API_KEY"))
    """W&B API key (WANDB_API_KEY); never written to a file, log or W&B config."""

    def resolved_backend(self) -> Literal["tinker", "local"]:
        """`auto` means Tinker's cloud when a key is configured, else the local server."""
        if self.backend == "auto":
            return "tinker" if self.tinker_api_key is not None else "local"
        return self.backend
