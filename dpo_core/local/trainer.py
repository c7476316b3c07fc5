"""LoRA training models of the local server: create, forward/backward, AdamW steps, save and load.

Only the `cross_entropy` loss (`sum_t -logprob_t * weight_t`) is served: `forward_backward_custom` and DPO need
no other. Speed notes (measured on 2 vCPUs, see bench/):
- per-token logprobs are `gather - logsumexp` over chunks of positions (`logprobs.py`), never the full
  [tokens x vocab] logits (cross_entropy on transposed logits was ~4x slower);
- `forward_backward_custom` sends a forward-only pass and then a forward_backward over the same datums: the
  first pass keeps its autograd graph (up to `graph_cache_tokens`), so the second runs only backward;
- a request's datums run in micro-batches of at most `micro_batch_tokens` padded tokens, bucketed by length
  (little padding), gradients accumulate;
- `recompute_layers` of the decoder layers keep only their inputs for backward and recompute the rest there
  (`memory.py`): what bounds the memory of a kept graph.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpo_core.local import budget as budgets
from dpo_core.local import ids
from dpo_core.local.batching import length_buckets
from dpo_core.local.checkpoints import CheckpointStore
from dpo_core.local.logprobs import final_hidden_states, token_logprobs
from dpo_core.local.memory import recompute_layers
from dpo_core.local.store import ModelStore
from dpo_core.local.validation import UserError, check_datums, check_loss_fn
from dpo_core.models import MODEL_LOAD_LOCK

TARGETS_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS_MLP = ["gate_proj", "up_proj", "down_proj"]
LORA_ALPHA = 32  # fixed alpha: the effective scale is alpha / rank, as in Tinker's LoRA
DEFAULT_LORA = {"rank": 32, "seed": None, "train_mlp": True, "train_attn": True, "train_unembed": True}
PROBE_TOKENS = 16  # the forward run after each step (and before each save) to prove the weights still work


@dataclass
class Datum:
    tokens: list[int]
    target_tokens: np.ndarray  # int64 [N]
    weights: np.ndarray  # float32 [N]


def micro_batches(lengths: list[int], budget_tokens: int) -> list[list[int]]:
    """Training micro-batches: bucketed by length under the token budget (a DPO batch alternates long and short
    responses, and in arrival order a group padded everything to its longest). The forward-only pass and the
    backward that follows group alike, which the kept graphs rely on."""
    return length_buckets(lengths, budget_tokens)


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
    probe_tokens: list[int] = field(default_factory=list)  # the start of the last datum trained on
    user_metadata: dict[str, str] | None = None  # the training run's (create_model), kept in its checkpoints

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of the LoRA weights (peft's key layout)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.module).items()}


def new_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with placeholder hyperparameters: every `optim_step` sets the ones the client sent."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


class Trainer:
    """The live LoRA training models, keyed by model id (= training run id)."""

    def __init__(self, store: ModelStore, checkpoints: CheckpointStore, counters: dict[str, int],
                 micro_batch_tokens: int = 2048, graph_cache_tokens: int = 16384, max_models: int = 0,
                 recompute_layers: float = 0.0):
        self.store, self.checkpoints, self.counters = store, checkpoints, counters
        self.micro_batch_tokens = micro_batch_tokens
        self.graph_cache_tokens = graph_cache_tokens
        self.recompute_layers = recompute_layers  # share of decoder layers recomputed in backward (memory.py)
        self.models: dict[str, TrainingModel] = {}
        self.max_models = max_models  # each holds a copy of its base model: ~12 MB for local/tiny, far more else

    # ------------------------------------------------------------------ lifetime
    def get(self, model_id: str) -> TrainingModel:
        if model_id not in self.models:
            raise UserError(f"unknown model_id {model_id!r} (the local server may have restarted: "
                            "resume from a saved state path)")
        entry = self.models[model_id]
        entry.last_request = time.time()
        self.store.use_threads_for(entry.base_model)
        return entry

    def create(self, model_id: str, base_model: str, lora: dict[str, Any] | None,
               user_metadata: dict[str, str] | None = None) -> str:
        from peft import LoraConfig, get_peft_model

        if model_id in self.models:  # replacing it would silently drop another client's weights
            raise UserError(f"model {model_id!r} already exists: use a new model_seq_id, or unload_model first")
        if self.max_models and len(self.models) >= self.max_models:
            raise UserError(f"the server holds {len(self.models)} live training models, its cap "
                            "(DPO_LOCAL_MAX_TRAINING_MODELS): finish a session or unload_model first")
        lora = {**DEFAULT_LORA, **(lora or {})}
        if int(lora["rank"]) < 1:
            raise UserError(f"lora rank must be >= 1, got {lora['rank']}")
        base = self.store.base(base_model)
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
        with MODEL_LOAD_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else int(seed))
            # peft rewires the module it is given, so it gets a copy of the module tree, but the copy shares the
            # frozen base tensors: nothing writes them, and a second copy per training model (0.5 GB for SmolLM2
            # in fp32) showed up in peak RSS.
            shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
            module = get_peft_model(copy.deepcopy(base, memo=shared), config)
        module.eval()  # no dropout anywhere; LoRA params still train
        if self.recompute_layers:
            try:
                recompute_layers(module, self.recompute_layers)
            except NotImplementedError:  # no `layers` list to wrap: it trains as fast as before, with more memory
                pass
        params = [p for p in module.parameters() if p.requires_grad]
        self.models[model_id] = TrainingModel(model_id, base_model, lora, module, new_optimizer(params),
                                              user_metadata=user_metadata)
        return model_id

    def create_from_checkpoint(self, model_id: str, tinker_path: str, with_optimizer: bool) -> str:
        meta = self.checkpoints.read_meta(tinker_path)
        self.create(model_id, meta["base_model"], meta["lora"], meta.get("user_metadata"))
        self.load(model_id, tinker_path, with_optimizer)
        return model_id

    def unload(self, model_id: str) -> None:
        self.models.pop(model_id, None)

    def release_session(self, session_id: str) -> int:
        """Drop the training models a finished session created; returns how many."""
        owned = [m for m in self.models if ids.belongs_to(session_id, m)]
        for model_id in owned:
            del self.models[model_id]
        return len(owned)

    # ------------------------------------------------------------------ forward / backward
    def _micro_batches(self, data: list[Datum]) -> list[list[int]]:
        return micro_batches([len(datum.tokens) for datum in data], self.micro_batch_tokens)

    def _logprobs(self, module: Any, data: list[Datum], indices: list[int]) -> list[torch.Tensor]:
        """Per-token fp32 logprobs of each datum's target tokens, differentiable w.r.t. the LoRA weights.

        The unembedding runs chunk by chunk (`token_logprobs`): neither this pass nor a graph kept for the
        backward ever holds [tokens x vocab] logits, which dominated peak memory (0.8 GB per 4096 SmolLM2 tokens).
        """
        lengths = [len(data[i].tokens) for i in indices]
        # Right padding needs no attention mask: causal attention never looks ahead at the pads.
        input_ids = torch.zeros((len(indices), max(lengths)), dtype=torch.long)
        for row, i in enumerate(indices):
            input_ids[row, : lengths[row]] = torch.tensor(data[i].tokens, dtype=torch.long)
        targets = torch.cat([torch.from_numpy(data[i].target_tokens.astype(np.int64)) for i in indices])
        hidden, head = final_hidden_states(module, input_ids.to(self.store.device))
        # The pads are dropped before the head: they would cost a vocab-wide matmul each and score nothing.
        real_positions = torch.cat([hidden[row, :n] for row, n in enumerate(lengths)])
        logprobs = token_logprobs(real_positions, head.weight, targets.to(self.store.device), bias=head.bias)
        return list(logprobs.split(lengths))

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
        """Per-datum target logprobs and `loss:sum`; with `forward_only=False` also accumulates gradients."""
        check_loss_fn(loss_fn)
        check_datums(data)
        entry = self.get(model_id)
        vocab = self.store.base(entry.base_model).config.vocab_size
        for index, datum in enumerate(data):
            if max(datum.tokens, default=0) >= vocab or int(datum.target_tokens.max(initial=0)) >= vocab:
                raise UserError(f"data[{index}]: token id out of range for {entry.base_model} (allowed 0..{vocab - 1})")
        if entry.kept_version != entry.version:
            entry.kept_graphs.clear()
        if forward_only:
            return self._forward(entry, data)
        outputs: list[np.ndarray | None] = [None] * len(data)
        self.counters["forward_backward_requests"] += 1
        grads_before = [None if p.grad is None else p.grad.clone() for p in entry.trainable()]
        try:
            total_loss = self._accumulate(entry, data, outputs)
        except BaseException:  # out of budget or non-finite: the gradients stay as they were before this request
            for param, grad in zip(entry.trainable(), grads_before):
                param.grad = grad
            entry.kept_graphs.clear()
            raise
        entry.kept_graphs.clear()
        return outputs, {"loss:sum": total_loss}

    def _accumulate(self, entry: TrainingModel, data: list[Datum], outputs: list[np.ndarray | None]) -> float:
        """Backward over `data` micro-batch by micro-batch; fills `outputs`, returns `loss:sum`."""
        total_loss = 0.0
        for indices in self._micro_batches(data):
            budgets.current().check()
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
            if not torch.isfinite(loss):
                raise UserError("forward_backward: the loss is not finite (NaN or inf); no gradient was applied")
            loss.backward()
            total_loss += float(loss.detach())
            self.counters["trained_tokens"] += sum(len(data[i].tokens) for i in indices)
        return total_loss

    def _forward(self, entry: TrainingModel, data: list[Datum]) -> tuple[list[np.ndarray], dict[str, float]]:
        """A forward-only pass that keeps its graphs (within budget) for the backward that usually follows."""
        outputs: list[np.ndarray | None] = [None] * len(data)
        total_loss = 0.0
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

    def optim_step(self, model_id: str, adam: dict[str, Any]) -> dict[str, float]:
        entry = self.get(model_id)
        entry.kept_graphs.clear()
        params = entry.trainable()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.zeros(())
        if not torch.isfinite(grad_norm):
            entry.optimizer.zero_grad(set_to_none=True)  # the poisoned accumulation is dropped, weights untouched
            raise UserError("optim_step: the accumulated gradients are not finite; the step was refused, the "
                            "model is unchanged and its gradients were cleared")
        torch.nn.utils.clip_grad_norm_(params, max_norm=float(adam.get("grad_clip_norm") or 0.0) or float("inf"))
        for group in entry.optimizer.param_groups:
            group["lr"] = float(adam.get("learning_rate", 1e-4))
            group["betas"] = (float(adam.get("beta1", 0.9)), float(adam.get("beta2", 0.95)))
            group["eps"] = float(adam.get("eps", 1e-12))
            group["weight_decay"] = float(adam.get("weight_decay", 0.0))
        # Kept to undo a step that would overflow (finite inputs can still reach inf with an extreme rate), or
        # that keeps the weights finite but so large that the forward overflows (a learning rate of 1e30 did).
        weights_before = [p.detach().clone() for p in params]
        state_before = copy.deepcopy(entry.optimizer.state_dict())
        entry.optimizer.step()
        if not all(bool(torch.isfinite(p).all()) for p in params):
            problem = "would write NaN/inf into the weights"
        elif not self.forward_is_finite(entry):
            problem = f"would make the model's forward NaN/inf (on {PROBE_TOKENS} tokens of the last datum)"
        else:
            problem = None
        if problem is not None:
            with torch.no_grad():
                for param, before in zip(params, weights_before):
                    param.copy_(before)
            entry.optimizer.load_state_dict(state_before)
            raise UserError(f"optim_step: this step {problem} (learning rate {adam.get('learning_rate')}); it was "
                            "rolled back and the model left as it was: lower the learning rate")
        entry.optimizer.zero_grad(set_to_none=True)
        entry.version += 1
        entry.steps += 1
        return {"grad_norm:mean": float(grad_norm)}

    # ------------------------------------------------------------------ checkpoints
    def save(self, model_id: str, kind: str, name: str, with_optimizer: bool, overwrite: bool,
             ttl_seconds: int | None = None) -> str:
        """Write the model's LoRA weights (and optimizer state) to `tinker://<model_id>/<kind>/<name>`."""
        from peft import get_peft_model_state_dict

        entry = self.get(model_id)
        if not self.forward_is_finite(entry):  # a checkpoint that only produces NaN would poison every resume
            raise UserError(f"refusing to save {model_id}/{kind}/{name}: the model's forward gives NaN/inf")
        meta = {"base_model": entry.base_model, "lora": entry.lora, "model_id": entry.model_id, "steps": entry.steps,
                "user_metadata": entry.user_metadata,
                "expires_at": None if ttl_seconds is None else time.time() + ttl_seconds}
        extra = None
        if kind == "external_weights":  # a PEFT adapter_config.json beside the weights, as Tinker's export has
            config = entry.module.peft_config["default"]
            extra = {"adapter_config.json": json.dumps({
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": entry.base_model,
                "r": int(config.r), "lora_alpha": config.lora_alpha, "lora_dropout": 0.0, "bias": "none",
                "target_modules": sorted(config.target_modules)}, indent=2).encode()}
        return self.checkpoints.write(
            entry.model_id, kind, name, meta=meta, adapter_state=get_peft_model_state_dict(entry.module),
            optimizer_state=entry.optimizer.state_dict() if with_optimizer else None, overwrite=overwrite,
            extra_files=extra)

    @torch.no_grad()
    def forward_is_finite(self, entry: TrainingModel) -> bool:
        """Whether the model's logits over a few tokens (of the last datum trained on) are all finite."""
        tokens = entry.probe_tokens or list(range(1, PROBE_TOKENS + 1))
        input_ids = torch.tensor([tokens[:PROBE_TOKENS]], dtype=torch.long, device=self.store.device)
        return bool(torch.isfinite(entry.module(input_ids=input_ids).logits).all())

    def load(self, model_id: str, tinker_path: str, with_optimizer: bool) -> None:
        """Replace the model's LoRA weights (and, with `with_optimizer`, its Adam moments) from a checkpoint."""
        from peft import set_peft_model_state_dict

        entry = self.get(model_id)
        meta = self.checkpoints.read_meta(tinker_path)
        if meta["base_model"] != entry.base_model or int(meta["lora"]["rank"]) != int(entry.lora["rank"]):
            raise UserError(f"checkpoint {tinker_path} is for {meta['base_model']} rank {meta['lora']['rank']}, "
                            f"not {entry.base_model} rank {entry.lora['rank']}")
        if with_optimizer and self.checkpoints.resolve(tinker_path).kind != "weights":
            raise UserError(f"{tinker_path} is a sampler checkpoint: it has no optimizer state")
        result = set_peft_model_state_dict(entry.module, self.checkpoints.load_adapter(tinker_path, self.store.device))
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"checkpoint {tinker_path} does not match the model's LoRA layout")
        entry.optimizer = new_optimizer(entry.trainable())
        if with_optimizer:
            entry.optimizer.load_state_dict(self.checkpoints.load_optimizer(tinker_path, self.store.device))
        entry.steps = int(meta.get("steps", 0))
        entry.version += 1
        entry.kept_graphs.clear()
