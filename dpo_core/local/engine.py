"""The PyTorch engine behind the local Tinker-compatible server: one object the routes call.

It composes the model store (`store.py`), the LoRA trainer (`trainer.py`), the checkpoint store
(`checkpoints.py`) and the sampler (`sampler.py`), and answers each route with one method whose result is
the reply's content. One engine thread runs every queued request (the server's worker), so nothing here is
thread-safe by itself; the few synchronous routes (get_info, create_sampling_session, weights_info) only read,
or load a base model under the store's lock. Tensors cross the boundary as plain Python/numpy values; the wire
format lives in `protocol.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dpo_core.local import ids
from dpo_core.local.checkpoints import CheckpointRef, CheckpointStore, iso_time
from dpo_core.local.memory import release_freed_memory
from dpo_core.local.sampler import SampleRequest, Sampler, SamplerSource
from dpo_core.local.store import ModelStore
from dpo_core.local.trainer import PROBE_TOKENS, Datum, Trainer
from dpo_core.local.validation import UserError
from dpo_core.models import ModelSpec

__all__ = ["Datum", "Engine", "SampleRequest", "UserError"]


class Engine:
    """Base models, LoRA training models, samplers and their on-disk checkpoints, behind one API."""

    def __init__(
        self,
        storage: Path,
        cache_dir: Path,
        local_models: dict[str, Path] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
        micro_batch_tokens: int = 2048,
        graph_cache_tokens: int = 16384,
        merged_cache_size: int = 4,  # one per concurrent evaluation (the suite runs 4), else they thrash
        stand_in: str = "",
        max_training_models: int = 16,  # live LoRA training models, all sessions together (0 = no cap)
        recompute_layers: float = 0.0,  # share of decoder layers recomputed in backward instead of kept
        mmap_threshold_bytes: int = 0,  # > 0: freed large tensors go back to the OS (process-wide; memory.py)
        max_snapshots: int = 32,  # snapshot samplers held, all sessions together (least recently used go first)
        max_snapshots_per_session: int = 8,
    ):
        release_freed_memory(mmap_threshold_bytes)
        # Counters for tests and benchmarks (e.g. "reference logprobs computed once per sweep").
        self.counters: dict[str, int] = {
            "forward_requests": 0, "forward_backward_requests": 0, "graph_reuse_microbatches": 0,
            "sample_requests": 0, "prompt_logprob_requests": 0, "prompt_logprob_tokens": 0,
            "sampled_tokens": 0, "trained_tokens": 0, "prefill_tokens": 0,
        }
        self.store = ModelStore(cache_dir, local_models, device=device, dtype=dtype, threads=threads,
                                stand_in=stand_in)
        self.checkpoints = CheckpointStore(storage)
        self.trainer = Trainer(self.store, self.checkpoints, self.counters, micro_batch_tokens, graph_cache_tokens,
                               max_models=max_training_models, recompute_layers=recompute_layers)
        self.sampler = Sampler(self.store, self.checkpoints, self.counters, merged_cache_size,
                               max_snapshots=max_snapshots, max_snapshots_per_session=max_snapshots_per_session)

    @property
    def storage(self) -> Path:
        return self.checkpoints.storage

    def served_models(self) -> list[ModelSpec]:
        return self.store.served_models()

    def can_load(self, spec: ModelSpec) -> bool:
        return self.store.can_load(spec)
    def context_length(self, base_model: str) -> int:
        """The longest sequence (prompt + completion) `base_model` takes; a `UserError` for an unknown one."""
        for spec in self.served_models():
            if spec.name == base_model:
                return spec.max_context_length
        raise UserError(f"base model {base_model!r} is not served here "
                        f"(served: {', '.join(s.name for s in self.served_models())})")

    def model_context_length(self, model_id: str) -> int:
        """The context length of a live training model; unbounded for an unknown one (its job says so)."""
        entry = self.trainer.models.get(model_id)
        return self.context_length(entry.base_model) if entry is not None else 1 << 62

    # ------------------------------------------------------------------ training models
    def create_model(self, model_id: str, base_model: str, lora: dict[str, Any] | None,
                     user_metadata: dict[str, str] | None = None) -> str:
        return self.trainer.create(model_id, base_model, lora, user_metadata)

    def create_from_checkpoint(self, model_id: str, tinker_path: str, optimizer: bool) -> str:
        return self.trainer.create_from_checkpoint(model_id, tinker_path, optimizer)

    def load_weights(self, model_id: str, tinker_path: str, optimizer: bool) -> str:
        self.trainer.load(model_id, tinker_path, optimizer)
        return model_id

    def unload_model(self, model_id: str) -> str:
        self.trainer.unload(model_id)
        return model_id

    def release_session(self, session_id: str) -> int:
        """Free what a finished client session held: its training models and ephemeral samplers."""
        return self.trainer.release_session(session_id) + self.sampler.release_session(session_id)

    def expire_sessions(self, expired: list[str], live: set[str], idle_s: float) -> int:
        """Free what expired sessions held, and training models idle for `idle_s` whose session is not live."""
        released = sum(self.release_session(session_id) for session_id in expired)
        stale = [m for m, entry in self.trainer.models.items()
                 if ids.session_of(m) not in live and time.time() - entry.last_request > idle_s]
        for model_id in stale:  # with its session's samplers: a snapshot outliving its model was never swept
            self.trainer.unload(model_id)
            released += self.sampler.release_session(ids.session_of(model_id))
        return released + len(stale)

    def info(self, model_id: str) -> dict[str, Any]:
        entry = self.trainer.get(model_id)
        arch = type(self.store.base(entry.base_model)).__name__
        return {
            "type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": int(entry.lora["rank"]),
            "model_name": entry.base_model,
            "model_data": {"model_name": entry.base_model, "arch": arch,
                           "tokenizer_id": self.store.tokenizer_id(entry.base_model)},
        }

    def forward_backward(self, model_id: str, data: list[Datum], loss_fn: str, forward_only: bool
                         ) -> tuple[list[np.ndarray], dict[str, float]]:
        result = self.trainer.forward_backward(model_id, data, loss_fn, forward_only)
        if not forward_only:  # what the next optim_step proves its result on (real tokens, in the vocabulary)
            self.trainer.models[model_id].probe_tokens = list(data[0].tokens[:PROBE_TOKENS])
        return result

    def optim_step(self, model_id: str, adam: dict[str, Any]) -> dict[str, float]:
        return self.trainer.optim_step(model_id, adam)

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, model_id: str, name: str, overwrite: bool = False, ttl_seconds: int | None = None) -> str:
        return self.trainer.save(model_id, "weights", name, with_optimizer=True, overwrite=overwrite,
                                 ttl_seconds=ttl_seconds)

    def save_sampler(self, model_id: str, name: str, ttl_seconds: int | None = None) -> str:
        return self.trainer.save(model_id, "sampler_weights", name, with_optimizer=False, overwrite=True,
                                 ttl_seconds=ttl_seconds)

    def save_external(self, model_id: str, name: str) -> str:
        return self.trainer.save(model_id, "external_weights", name, with_optimizer=False, overwrite=False)

    def checkpoint_dir(self, tinker_path: str) -> CheckpointRef:
        """`(run_id, kind, name, folder)` of a `tinker://` path; a `UserError` for one outside storage."""
        return self.checkpoints.resolve(tinker_path)

    def read_meta(self, tinker_path: str) -> dict[str, Any]:
        return self.checkpoints.read_meta(tinker_path)

    def weights_info(self, tinker_path: str) -> dict[str, Any]:
        meta = self.checkpoints.read_meta(tinker_path)
        lora = meta["lora"]
        return {"base_model": meta["base_model"], "is_lora": True, "lora_rank": int(lora["rank"]),
                "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
                "train_attn": lora.get("train_attn")}

    def list_checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return self.checkpoints.list(run_id)

    def checkpoints_page(self, limit: int, offset: int) -> dict[str, Any]:
        found = self.checkpoints.list_all()
        return {"checkpoints": found[offset: offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(found)}}

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        self.checkpoints.delete(run_id, checkpoint_id)

    def training_run(self, run_id: str) -> dict[str, Any]:
        """The SDK's `TrainingRun` record: from the live model when there is one, else from its checkpoints."""
        checkpoints = self.checkpoints.list(run_id)
        entry = self.trainer.models.get(run_id)
        if entry is None:
            if not checkpoints:
                raise UserError(f"training run not found: {run_id}")
            meta = self.checkpoints.read_meta(checkpoints[-1]["tinker_path"], allow_expired=True)
            base, lora, last_request = meta["base_model"], meta["lora"], None
            user_metadata = meta.get("user_metadata")
        else:
            base, lora, last_request = entry.base_model, entry.lora, entry.last_request
            user_metadata = entry.user_metadata
        last = {"training": None, "sampler": None}
        for ckpt in sorted(checkpoints, key=lambda c: c["time"]):
            last[ckpt["checkpoint_type"]] = ckpt
        return {
            "training_run_id": run_id, "base_model": base, "model_owner": "local", "is_lora": True,
            "lora_rank": int(lora["rank"]), "last_request_time": iso_time(last_request),
            "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"],
            "user_metadata": user_metadata,
        }

    def training_runs_page(self, limit: int, offset: int) -> dict[str, Any]:
        runs = []
        for run_id in self.checkpoints.run_ids():
            try:
                runs.append(self.training_run(run_id))
            except UserError:  # an empty or half-deleted run folder is no run: it must not fail the listing
                continue
        return {"training_runs": runs[offset: offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    # ------------------------------------------------------------------ sampling
    def create_sampler(self, sampler_id: str, base_model: str | None, model_path: str | None) -> str:
        return self.sampler.create_session(sampler_id, base_model, model_path)

    def snapshot_sampler(self, model_id: str, sampler_id: str) -> str:
        entry = self.trainer.get(model_id)
        return self.sampler.add_snapshot(sampler_id, entry.base_model, entry.lora, entry.adapter_state())

    def sampler_info(self, sampler_id: str) -> dict[str, Any]:
        source = self.sampler.session(sampler_id)
        return {"sampler_id": sampler_id, "base_model": source.base_model, "model_path": source.model_path}

    def sampler_source(self, sampler_id: str | None, base_model: str | None, model_path: str | None
                       ) -> SamplerSource:
        return self.sampler.source(sampler_id, base_model, model_path)

    def sample_group_key(self, source: SamplerSource, params: dict[str, Any]) -> str:
        return self.sampler.group_key(source, params)

    def sample_batch(self, source: SamplerSource, requests: list[SampleRequest]) -> list[dict[str, Any] | Exception]:
        """Serve several sampling requests of one sampler in one batched generation; a result or error each."""
        results: list[dict[str, Any] | Exception] = [None] * len(requests)  # type: ignore[list-item]

        def deliver(position: int, outcome: dict[str, Any] | Exception) -> None:
            results[position] = outcome

        self.sample_stream(source, requests, deliver)
        return results

    def sample_stream(self, source: SamplerSource, requests: list[SampleRequest],
                      deliver: Callable[[int, dict[str, Any] | Exception], None],
                      admit: Callable[[int], list[SampleRequest]] | None = None) -> None:
        """Continuous batching (`Sampler.decode`): requests `admit` hands over join while it decodes; each is
        answered through `deliver` as soon as it is done. Never answers NaN: weights whose logits are not finite
        are refused before decoding (on CUDA, decoding NaN could end the process's use of the GPU), the decoder
        fails a request whose rows' logits turn non-finite, and every result is checked once more on the way out.
        """
        broken = UserError(f"the weights of this sampler ({source.model_path or source.base_model}) give NaN/inf "
                           "logits, so there is nothing to sample; sample a checkpoint saved before they broke")
        if not self.sampler.weights_are_finite(source):
            for position in range(len(requests)):
                deliver(position, broken)
            return

        def checked(position: int, outcome: dict[str, Any] | Exception) -> None:
            deliver(position, broken if isinstance(outcome, dict) and not _finite_result(outcome) else outcome)

        self.sampler.decode(source, requests, checked, admit)


def _finite_result(result: dict[str, Any]) -> bool:
    """Every sampled logprob and every prompt logprob after the first (NaN by convention) is finite."""
    sampled = [np.asarray(sequence["logprobs"], dtype=np.float64) for sequence in result.get("sequences", [])]
    prompt = result.get("prompt_logprobs")
    return (all(np.isfinite(values).all() for values in sampled)
            and (prompt is None or bool(np.isfinite(np.asarray(prompt, dtype=np.float64)[1:]).all())))
