"""The PyTorch engine behind the local Tinker-compatible server.

transformers causal LMs + peft LoRA adapters. One engine thread runs every request (the server's worker),
so nothing here is thread-safe by itself. Tensors cross the boundary as plain Python/numpy values; the
wire format lives in `protocol.py`.

Speed notes (measured on 2 vCPUs, see bench/):
- per-token logprobs are `gather - logsumexp` (cross_entropy on transposed logits was ~4x slower);
- `forward_backward_custom` sends a forward-only pass and then a forward_backward over the same datums:
  the first pass keeps its autograd graph (up to `graph_cache_tokens`), so the second runs only backward;
- sampling runs on a copy of the base weights with the LoRA merged in (unmerged was ~30% slower).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_core.fsutil import atomic_folder
from dpo_core.local import models as model_registry

TARGETS_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS_MLP = ["gate_proj", "up_proj", "down_proj"]
LORA_ALPHA = 32  # fixed alpha: the effective scale is alpha / rank, as in Tinker's LoRA
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class UserError(Exception):
    """A request the client must fix (unknown model, bad path...). Reported, never retried."""


@dataclass
class Datum:
    tokens: list[int]
    target_tokens: np.ndarray  # int64 [N]
    weights: np.ndarray  # float32 [N]


@dataclass
class TrainingModel:
    model_id: str
    base_model: str
    lora: dict[str, Any]
    module: Any  # peft model
    optimizer: torch.optim.Optimizer
    created: float = field(default_factory=time.time)
    last_request: float = field(default_factory=time.time)
    version: int = 0  # bumped whenever the weights change: invalidates kept graphs
    steps: int = 0
    kept_graphs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    kept_version: int = -1

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


@dataclass
class SampleRequest:
    prompt: list[int]
    num_samples: int
    params: dict[str, Any]
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class SamplerSource:
    base_model: str
    model_path: str | None = None  # tinker:// sampler or state path
    adapter_state: dict[str, torch.Tensor] | None = None  # ephemeral snapshot
    lora: dict[str, Any] | None = None
    key: str = ""


class Engine:
    """Holds base models, LoRA training models, samplers and their on-disk checkpoints."""

    def __init__(
        self,
        storage: Path,
        cache_dir: Path,
        local_models: dict[str, Path] | None = None,
        device: str = "auto",
        threads: int = 0,
        micro_batch_tokens: int = 2048,
        graph_cache_tokens: int = 16384,
        merged_cache_size: int = 4,  # one per concurrent evaluation (the suite runs 4), else they thrash
    ):
        self.storage = Path(storage).resolve()
        (self.storage / "runs").mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(cache_dir)
        self.local_models = dict(local_models or {})
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.threads = threads
        self.micro_batch_tokens = micro_batch_tokens
        self.graph_cache_tokens = graph_cache_tokens
        self.merged_cache_size = merged_cache_size
        self._bases: dict[str, Any] = {}
        self._base_lock = threading.Lock()
        self._tokenizers: dict[str, Any] = {}
        self._merged: OrderedDict[str, Any] = OrderedDict()
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, SamplerSource] = {}
        # Counters for tests and benchmarks (e.g. "reference logprobs computed once per sweep").
        self.counters: dict[str, int] = {
            "forward_requests": 0, "forward_backward_requests": 0, "graph_reuse_microbatches": 0,
            "sample_requests": 0, "prompt_logprob_requests": 0, "prompt_logprob_tokens": 0,
            "sampled_tokens": 0, "trained_tokens": 0,
        }

    # ------------------------------------------------------------------ models
    def served_models(self) -> list[model_registry.ModelSpec]:
        return list(model_registry.model_specs(self.local_models).values())

    def _set_threads(self, base_model: str) -> None:
        if self.device != "cpu":
            return
        wanted = self.threads or (1 if base_model == model_registry.TINY else 2)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def base(self, name: str) -> Any:
        with self._base_lock:  # also called from the HTTP thread (create_sampling_session)
            if name not in self._bases:
                try:
                    model_registry.get_spec(name, self.local_models)
                except KeyError as exc:
                    raise UserError(str(exc.args[0])) from None
                self._bases[name] = model_registry.load_model(
                    name, self.cache_dir, self.local_models, dtype=self.dtype, device=self.device
                )
        self._set_threads(name)
        return self._bases[name]

    def tokenizer(self, name: str) -> Any:
        if name not in self._tokenizers:
            self._tokenizers[name] = model_registry.load_tokenizer(name, self.cache_dir, self.local_models)
        return self._tokenizers[name]

    def _model(self, model_id: str) -> TrainingModel:
        if model_id not in self.models:
            raise UserError(f"unknown model_id {model_id!r} (the local server may have restarted: "
                            "resume from a saved state path)")
        entry = self.models[model_id]
        entry.last_request = time.time()
        self._set_threads(entry.base_model)
        return entry

    def create_model(self, model_id: str, base_model: str, lora: dict[str, Any] | None) -> str:
        from peft import LoraConfig, get_peft_model

        lora = {"rank": 32, "seed": None, "train_mlp": True, "train_attn": True, "train_unembed": True,
                **(lora or {})}
        if int(lora["rank"]) < 1:
            raise UserError(f"lora rank must be >= 1, got {lora['rank']}")
        base = self.base(base_model)
        targets = (TARGETS_ATTN if lora["train_attn"] else []) + (TARGETS_MLP if lora["train_mlp"] else [])
        # A tied unembedding shares the input embedding's weight; peft cannot adapt one without the other,
        # so train_unembed only applies to models with a separate lm_head.
        if lora["train_unembed"] and not getattr(base.config, "tie_word_embeddings", False):
            targets.append("lm_head")
        if not targets:
            raise UserError("lora_config trains nothing: enable train_attn, train_mlp or train_unembed")
        config = LoraConfig(r=int(lora["rank"]), lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                            target_modules=targets, bias="none")
        seed = lora.get("seed")
        with model_registry.MODEL_LOAD_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else int(seed))
            module = get_peft_model(copy.deepcopy(base), config)
        module.eval()  # no dropout anywhere; LoRA params still train
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        self.models[model_id] = TrainingModel(model_id, base_model, lora, module, optimizer)
        return model_id

    def release_session(self, session_id: str) -> int:
        """Free what a finished client session held: its training models and ephemeral samplers."""
        prefix = f"{session_id}:"
        models = [m for m in self.models if m.startswith(prefix)]
        samplers = [s for s in self.samplers if s.startswith(prefix)]
        for model_id in models:
            del self.models[model_id]
        for sampler_id in samplers:
            source = self.samplers.pop(sampler_id)
            if source.adapter_state is not None:
                self._merged.pop(source.key, None)
        return len(models) + len(samplers)

    def info(self, model_id: str) -> dict[str, Any]:
        entry = self._model(model_id)
        arch = type(self.base(entry.base_model)).__name__
        return {
            "type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": int(entry.lora["rank"]),
            "model_name": entry.base_model,
            "model_data": {"model_name": entry.base_model, "arch": arch, "tokenizer_id": str(
                model_registry.tokenizer_dir(entry.base_model, self.cache_dir, self.local_models))},
        }

    # ------------------------------------------------------------------ forward / backward
    def _micro_batches(self, data: list[Datum]) -> list[list[int]]:
        """Group datum indices so each group's padded size stays under the micro-batch token budget."""
        groups: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index, datum in enumerate(data):
            length = len(datum.tokens)
            if current and max(longest, length) * (len(current) + 1) > self.micro_batch_tokens:
                groups.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            groups.append(current)
        return groups

    def _logprobs(self, module: Any, data: list[Datum], indices: list[int]) -> list[torch.Tensor]:
        """Per-token logprobs of each datum's target tokens (gather - logsumexp)."""
        longest = max(len(data[i].tokens) for i in indices)
        pad = 0
        # Right padding needs no attention mask: causal attention never looks ahead at the pads.
        input_ids = torch.full((len(indices), longest), pad, dtype=torch.long)
        targets = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(data[i].tokens)
            input_ids[row, :n] = torch.tensor(data[i].tokens, dtype=torch.long)
            targets[row, :n] = torch.from_numpy(data[i].target_tokens.astype(np.int64))
        input_ids, targets = input_ids.to(self.device), targets.to(self.device)
        logits = module(input_ids=input_ids, use_cache=False).logits.float()
        logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return [logprobs[row, : len(data[i].tokens)] for row, i in enumerate(indices)]

    @staticmethod
    def _graph_key(data: list[Datum], indices: list[int]) -> str:
        digest = hashlib.sha256()
        for i in indices:
            digest.update(np.asarray(data[i].tokens, dtype=np.int64).tobytes())
            digest.update(b"|")
            digest.update(data[i].target_tokens.astype(np.int64).tobytes())
            digest.update(b"#")
        return digest.hexdigest()

    def forward_backward(self, model_id: str, data: list[Datum], loss_fn: str, forward_only: bool
                         ) -> tuple[list[np.ndarray], dict[str, float]]:
        if loss_fn != "cross_entropy":
            raise UserError(f"loss_fn {loss_fn!r} is not supported by the local server (supported: cross_entropy)")
        if not data:
            raise UserError("forward_backward needs at least one datum")
        for index, datum in enumerate(data):
            if len(datum.target_tokens) != len(datum.tokens) or len(datum.weights) != len(datum.tokens):
                raise UserError(f"datum {index}: target_tokens and weights must have one entry per input token "
                                f"({len(datum.tokens)}), got {len(datum.target_tokens)} and {len(datum.weights)}")
        entry = self._model(model_id)
        vocab = self.base(entry.base_model).config.vocab_size
        for index, datum in enumerate(data):
            if max(datum.tokens, default=0) >= vocab or int(datum.target_tokens.max(initial=0)) >= vocab:
                raise UserError(f"datum {index}: token id out of range for {entry.base_model} (vocab {vocab})")
        outputs: list[np.ndarray | None] = [None] * len(data)
        total_loss = 0.0
        if entry.kept_version != entry.version:
            entry.kept_graphs.clear()
        if forward_only:
            self.counters["forward_requests"] += 1
            entry.kept_graphs.clear()
            budget = self.graph_cache_tokens
            for indices in self._micro_batches(data):
                tokens = sum(len(data[i].tokens) for i in indices)
                keep = tokens <= budget
                with torch.set_grad_enabled(keep):
                    logprobs = self._logprobs(entry.module, data, indices)
                if keep:
                    budget -= tokens
                    entry.kept_graphs[self._graph_key(data, indices)] = logprobs
                    entry.kept_version = entry.version
                for i, lp in zip(indices, logprobs):
                    weights = torch.from_numpy(data[i].weights.astype(np.float32)).to(lp.device)
                    total_loss += float(-(lp.detach() * weights).sum())
                    outputs[i] = lp.detach().float().cpu().numpy()
            return outputs, {"loss:sum": total_loss}
        self.counters["forward_backward_requests"] += 1
        for indices in self._micro_batches(data):
            kept = entry.kept_graphs.pop(self._graph_key(data, indices), None)
            if kept is not None:
                self.counters["graph_reuse_microbatches"] += 1
                logprobs = kept
            else:
                logprobs = self._logprobs(entry.module, data, indices)
            loss = logprobs[0].new_zeros(())
            for i, lp in zip(indices, logprobs):
                weights = torch.from_numpy(data[i].weights.astype(np.float32)).to(lp.device)
                loss = loss + (-(lp * weights).sum())
                outputs[i] = lp.detach().float().cpu().numpy()
            loss.backward()
            total_loss += float(loss.detach())
            self.counters["trained_tokens"] += sum(len(data[i].tokens) for i in indices)
        entry.kept_graphs.clear()
        return outputs, {"loss:sum": total_loss}

    def optim_step(self, model_id: str, adam: dict[str, Any]) -> dict[str, float]:
        entry = self._model(model_id)
        entry.kept_graphs.clear()
        params = entry.trainable()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, max_norm=float(adam.get("grad_clip_norm") or 0.0) or float("inf")
        )
        for group in entry.optimizer.param_groups:
            group["lr"] = float(adam.get("learning_rate", 1e-4))
            group["betas"] = (float(adam.get("beta1", 0.9)), float(adam.get("beta2", 0.95)))
            group["eps"] = float(adam.get("eps", 1e-12))
            group["weight_decay"] = float(adam.get("weight_decay", 0.0))
        entry.optimizer.step()
        entry.optimizer.zero_grad(set_to_none=True)
        entry.version += 1
        entry.steps += 1
        return {"grad_norm:mean": float(grad_norm)}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, tinker_path: str) -> tuple[str, str, str, Path]:
        """`tinker://<run>/<weights|sampler_weights>/<name>` -> its folder, refusing anything outside storage."""
        if not isinstance(tinker_path, str) or not tinker_path.startswith("tinker://"):
            raise UserError(f"not a tinker:// path: {tinker_path!r}")
        parts = tinker_path[len("tinker://"):].split("/")
        if len(parts) != 3 or parts[1] not in ("weights", "sampler_weights"):
            raise UserError(f"invalid tinker path {tinker_path!r}: expected tinker://<run>/weights|sampler_weights/<name>")
        run, kind, name = parts
        if not _safe_run_id(run) or not _NAME_RE.match(name) or name in (".", ".."):
            raise UserError(f"invalid tinker path {tinker_path!r}: names may use letters, digits, '.', '_', '-', ':'")
        folder = (self.storage / "runs" / run / kind / name).resolve()
        if not folder.is_relative_to(self.storage / "runs"):
            raise UserError(f"tinker path {tinker_path!r} escapes the server's storage")
        return run, kind, name, folder

    def _write_checkpoint(self, entry: TrainingModel, kind: str, name: str, with_optimizer: bool,
                          overwrite: bool) -> str:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not _NAME_RE.match(name or "") or name in (".", ".."):
            raise UserError(f"checkpoint name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        path = f"tinker://{entry.model_id}/{kind}/{name}"
        _, _, _, folder = self.checkpoint_dir(path)
        if folder.exists() and not overwrite:
            raise UserError(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
        with atomic_folder(folder) as tmp:
            state = {k: v.detach().to("cpu", torch.float32).contiguous()
                     for k, v in get_peft_model_state_dict(entry.module).items()}
            save_file(state, str(tmp / "adapter_model.safetensors"))
            if with_optimizer:
                torch.save(entry.optimizer.state_dict(), tmp / "optimizer.pt")
            meta = {"base_model": entry.base_model, "lora": entry.lora, "model_id": entry.model_id,
                    "steps": entry.steps, "kind": kind, "name": name, "time": _now_iso()}
            (tmp / "meta.json").write_text(json.dumps(meta))
        return path

    def save_state(self, model_id: str, name: str, overwrite: bool = False) -> str:
        return self._write_checkpoint(self._model(model_id), "weights", name, True, overwrite)

    def save_sampler(self, model_id: str, name: str) -> str:
        return self._write_checkpoint(self._model(model_id), "sampler_weights", name, False, True)

    def snapshot_sampler(self, model_id: str, sampling_session_id: str) -> str:
        from peft import get_peft_model_state_dict

        entry = self._model(model_id)
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(entry.module).items()}
        self.samplers[sampling_session_id] = SamplerSource(
            entry.base_model, adapter_state=state, lora=dict(entry.lora),
            key=f"ephemeral:{sampling_session_id}")
        return sampling_session_id

    def read_meta(self, tinker_path: str) -> dict[str, Any]:
        _, _, _, folder = self.checkpoint_dir(tinker_path)
        if not (folder / "meta.json").exists():
            raise UserError(f"checkpoint not found: {tinker_path}")
        return json.loads((folder / "meta.json").read_text())

    def load_weights(self, model_id: str, tinker_path: str, optimizer: bool) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        entry = self._model(model_id)
        meta = self.read_meta(tinker_path)
        _, kind, _, folder = self.checkpoint_dir(tinker_path)
        if meta["base_model"] != entry.base_model or int(meta["lora"]["rank"]) != int(entry.lora["rank"]):
            raise UserError(f"checkpoint {tinker_path} is for {meta['base_model']} rank {meta['lora']['rank']}, "
                            f"not {entry.base_model} rank {entry.lora['rank']}")
        if optimizer and kind != "weights":
            raise UserError(f"{tinker_path} is a sampler checkpoint: it has no optimizer state")
        state = load_file(str(folder / "adapter_model.safetensors"), device=self.device)
        result = set_peft_model_state_dict(entry.module, state)
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"checkpoint {tinker_path} does not match the model's LoRA layout")
        params = entry.trainable()
        entry.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        if optimizer:
            entry.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device))
        entry.steps = int(meta.get("steps", 0))
        entry.version += 1
        entry.kept_graphs.clear()

    def create_from_checkpoint(self, model_id: str, tinker_path: str, optimizer: bool) -> str:
        meta = self.read_meta(tinker_path)
        self.create_model(model_id, meta["base_model"], meta["lora"])
        self.load_weights(model_id, tinker_path, optimizer)
        return model_id

    def list_checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        if not _safe_run_id(run_id):
            raise UserError(f"invalid training run id {run_id!r}")
        found = []
        for kind, checkpoint_type in (("weights", "training"), ("sampler_weights", "sampler")):
            folder = self.storage / "runs" / run_id / kind
            for ckpt in sorted(folder.iterdir()) if folder.exists() else []:
                if not (ckpt / "meta.json").exists():
                    continue
                meta = json.loads((ckpt / "meta.json").read_text())
                found.append({
                    "checkpoint_id": f"{kind}/{ckpt.name}", "checkpoint_type": checkpoint_type,
                    "time": meta.get("time", _now_iso()), "tinker_path": f"tinker://{run_id}/{kind}/{ckpt.name}",
                    "size_bytes": sum(p.stat().st_size for p in ckpt.iterdir()),
                })
        return found

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        _, _, _, folder = self.checkpoint_dir(f"tinker://{run_id}/{checkpoint_id}")
        if not folder.exists():
            raise UserError(f"checkpoint not found: tinker://{run_id}/{checkpoint_id}")
        shutil.rmtree(folder)

    def training_run(self, run_id: str) -> dict[str, Any]:
        checkpoints = self.list_checkpoints(run_id)
        entry = self.models.get(run_id)
        meta = None
        if entry is None:
            if not checkpoints:
                raise UserError(f"training run not found: {run_id}")
            meta = self.read_meta(checkpoints[-1]["tinker_path"])
        base = entry.base_model if entry else meta["base_model"]
        lora = entry.lora if entry else meta["lora"]
        last = {"training": None, "sampler": None}
        for ckpt in sorted(checkpoints, key=lambda c: c["time"]):
            last[ckpt["checkpoint_type"]] = ckpt
        return {
            "training_run_id": run_id, "base_model": base, "model_owner": "local", "is_lora": True,
            "lora_rank": int(lora["rank"]),
            "last_request_time": _iso(entry.last_request if entry else time.time()),
            "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"],
        }

    # ------------------------------------------------------------------ sampling
    def create_sampler(self, sampling_session_id: str, base_model: str | None, model_path: str | None) -> str:
        if model_path:
            meta = self.read_meta(model_path)
            if base_model and base_model != meta["base_model"]:
                raise UserError(f"{model_path} was trained from {meta['base_model']}, not {base_model}")
            source = SamplerSource(meta["base_model"], model_path=model_path, lora=meta["lora"], key=model_path)
        elif base_model:
            self.base(base_model)
            source = SamplerSource(base_model, key=f"base:{base_model}")
        else:
            raise UserError("create_sampling_session needs base_model or model_path")
        self.samplers[sampling_session_id] = source
        return sampling_session_id

    def sampler_source(self, sampling_session_id: str | None, base_model: str | None,
                       model_path: str | None) -> SamplerSource:
        if sampling_session_id:
            if sampling_session_id not in self.samplers:
                raise UserError(f"unknown sampling session {sampling_session_id!r}")
            return self.samplers[sampling_session_id]
        if model_path:
            meta = self.read_meta(model_path)
            return SamplerSource(meta["base_model"], model_path=model_path, lora=meta["lora"], key=model_path)
        if base_model:
            return SamplerSource(base_model, key=f"base:{base_model}")
        raise UserError("a sample request needs a sampling session, a model_path or a base_model")

    def _sampling_module(self, source: SamplerSource) -> Any:
        base = self.base(source.base_model)
        if source.model_path is None and source.adapter_state is None:
            return base
        if source.key in self._merged:
            self._merged.move_to_end(source.key)
            return self._merged[source.key]
        state = source.adapter_state
        if state is None:
            from safetensors.torch import load_file

            _, _, _, folder = self.checkpoint_dir(source.model_path)
            state = load_file(str(folder / "adapter_model.safetensors"), device=self.device)
        merged = copy.deepcopy(base)
        _merge_lora(merged, state, scale=LORA_ALPHA / int(source.lora["rank"]))
        self._merged[source.key] = merged
        while len(self._merged) > self.merged_cache_size:
            self._merged.popitem(last=False)
        return merged

    def sample_group_key(self, source: SamplerSource, params: dict[str, Any]) -> str:
        """Requests with the same key can share one batched generation."""
        top_k = params.get("top_k")
        top_p = params.get("top_p")
        return json.dumps([source.key, -1 if top_k is None else int(top_k), 1.0 if top_p is None else float(top_p)])

    @torch.no_grad()
    def sample_batch(self, source: SamplerSource, requests: list[SampleRequest]) -> list[dict[str, Any] | Exception]:
        """Serve several sampling requests of one sampler in a single batched generation.

        Decoding a small model on a CPU is bound by reading the weights once per step, so one step for many
        rows costs about what it costs for one: requests queued together share the steps. Rows are left-padded
        (masked; positions counted per row), each sample has its own generator seeded `seed + index`, so a
        request's tokens do not depend on what it was batched with.
        """
        results: list[dict[str, Any] | Exception] = [None] * len(requests)  # type: ignore[list-item]
        live: list[int] = []
        module = self._sampling_module(source)
        vocab = module.config.vocab_size
        for index, request in enumerate(requests):
            if not request.prompt:
                results[index] = UserError("the prompt is empty")
            elif request.num_samples < 1:
                results[index] = UserError(f"num_samples must be >= 1, got {request.num_samples}")
            elif max(request.prompt) >= vocab or min(request.prompt) < 0:
                results[index] = UserError(f"prompt token id out of range for {source.base_model} (vocab {vocab})")
            else:
                live.append(index)
        if not live:
            return results
        self.counters["sample_requests"] += len(live)
        # One row per sample; remember which request and which sample index each row is.
        rows = [(i, j) for i in live for j in range(requests[i].num_samples)]
        prompts = [requests[i].prompt for i, _ in rows]
        longest = max(len(p) for p in prompts)
        pad = [longest - len(p) for p in prompts]
        input_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, tokens in enumerate(prompts):
            input_ids[r, pad[r]:] = torch.tensor(tokens, dtype=torch.long)
            attention[r, pad[r]:] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention, positions = (t.to(self.device) for t in (input_ids, attention, positions))
        decoder = getattr(module, module.base_model_prefix)
        head = module.get_output_embeddings()
        out = decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        hidden, past = out.last_hidden_state, out.past_key_values

        # Prompt logprobs from the prefill of each request's first row.
        first_row = {i: rows.index((i, 0)) for i in live}
        for i in live:
            request = requests[i]
            result: dict[str, Any] = {"prompt_logprobs": None, "topk_prompt": None}
            results[i] = result
            if not (request.prompt_logprobs or request.topk_prompt_logprobs):
                continue
            r = first_row[i]
            self.counters["prompt_logprob_requests"] += 1
            self.counters["prompt_logprob_tokens"] += len(request.prompt)
            logits = head(hidden[r, pad[r]:-1]).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            targets = input_ids[r, pad[r] + 1:]
            lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
            result["prompt_logprobs"] = np.concatenate([[np.nan], lp.cpu().numpy()]).astype(np.float32)
            if request.topk_prompt_logprobs:
                k = request.topk_prompt_logprobs
                values, ids = torch.topk(logits - log_norm.unsqueeze(-1), k=k, dim=-1)
                pad_ids = torch.full((1, k), -1, dtype=ids.dtype, device=ids.device)
                pad_vals = torch.full((1, k), float("nan"), device=values.device)
                result["topk_prompt"] = (torch.cat([pad_ids, ids]).cpu().numpy().astype(np.int32),
                                         torch.cat([pad_vals, values]).cpu().numpy().astype(np.float32))

        settings = []
        for i, j in rows:
            params = requests[i].params
            seed = params.get("seed")
            max_tokens = params.get("max_tokens")
            temperature = params.get("temperature")
            settings.append({
                "max_tokens": 16 if max_tokens is None else int(max_tokens),
                "temperature": 1.0 if temperature is None else float(temperature),
                "stops": self._stops(source.base_model, params.get("stop")),
                "generator": torch.Generator(device=self.device).manual_seed(
                    (int(seed) if seed is not None else int.from_bytes(os.urandom(6), "little")) + j),
            })
        first_params = requests[live[0]].params
        top_k = int(first_params.get("top_k") if first_params.get("top_k") is not None else -1)
        top_p = float(first_params.get("top_p") if first_params.get("top_p") is not None else 1.0)
        temperatures = torch.tensor([max(s["temperature"], 1e-6) for s in settings], device=self.device).unsqueeze(-1)
        greedy = [s["temperature"] <= 0 for s in settings]
        needs_text = any(s["stops"][1] for s in settings)
        tokenizer = self.tokenizer(source.base_model) if needs_text else None
        sequences: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        stop_reason = ["length"] * len(rows)
        done = [s["max_tokens"] <= 0 for s in settings]
        next_logits = head(hidden[:, -1]).float()
        steps = max(s["max_tokens"] for s in settings)
        for step in range(steps):
            log_probs = torch.log_softmax(next_logits / temperatures, dim=-1)
            filtered = _filter(log_probs, top_k, top_p).exp()
            greedy_choice = next_logits.argmax(dim=-1)
            chosen = torch.stack([
                greedy_choice[r] if greedy[r] else torch.multinomial(filtered[r], 1, generator=settings[r]["generator"])[0]
                for r in range(len(rows))
            ])
            chosen_lp = log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
            for r, token in enumerate(chosen.tolist()):
                if done[r]:
                    continue
                sequences[r].append(token)
                logprobs[r].append(chosen_lp[r])
                stop_ids, stop_strings = settings[r]["stops"]
                if token in stop_ids or (stop_strings and any(
                        text in tokenizer.decode(sequences[r][-32:]) for text in stop_strings)):
                    done[r], stop_reason[r] = True, "stop"
                elif len(sequences[r]) >= settings[r]["max_tokens"]:
                    done[r] = True
            if all(done):
                break
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            out = decoder(input_ids=chosen.unsqueeze(-1), attention_mask=attention, position_ids=positions,
                          past_key_values=past, use_cache=True)
            past, next_logits = out.past_key_values, head(out.last_hidden_state[:, -1]).float()
        self.counters["sampled_tokens"] += sum(len(seq) for seq in sequences)
        for i in live:
            results[i]["sequences"] = [
                {"tokens": sequences[r], "logprobs": logprobs[r], "stop_reason": stop_reason[r]}
                for r, (owner, _) in enumerate(rows) if owner == i
            ]
        return results

    def _stops(self, base_model: str, stop: Any) -> tuple[set[int], list[str]]:
        """`None` = the model's end-of-turn tokens; `[]` = never stop early; else the given ids or strings."""
        if stop is None:
            base = self.base(base_model)
            eos = base.config.eos_token_id
            ids = set(eos if isinstance(eos, list) else [eos]) - {None}
            tokenizer = self.tokenizer(base_model)
            if tokenizer.eos_token_id is not None:
                ids.add(tokenizer.eos_token_id)
            return ids, []
        if isinstance(stop, str):
            stop = [stop]
        ids = {int(s) for s in stop if isinstance(s, int)}
        strings = [s for s in stop if isinstance(s, str) and s]
        return ids, strings


def _filter(log_probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask tokens outside top-k / the top-p nucleus (to -inf), row by row."""
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


def _merge_lora(module: Any, adapter_state: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B @ A for every adapted linear layer (peft's saved key layout)."""
    for key, lora_a in adapter_state.items():
        if not key.endswith("lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        lora_b = adapter_state[prefix + ".lora_B.weight"]
        path = prefix.removeprefix("base_model.model.")
        target = module.get_submodule(path)
        delta = (lora_b.float() @ lora_a.float()) * scale
        target.weight.data += delta.to(target.weight.dtype).to(target.weight.device)


def _safe_run_id(run_id: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9._:-]{1,200}$", run_id or "")) and run_id not in (".", "..")


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat()


def _now_iso() -> str:
    return _iso(time.time())

