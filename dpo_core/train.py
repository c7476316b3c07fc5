"""The DPO loop over tinker SDK clients. It is handed a `ServiceClient` (Tinker's or the local server's).

Per step, on a batch of explicit (chosen, rejected) pairs:
1. reference logprobs come from `dpo_core.reference`'s on-disk cache, keyed by the reference (model and the
   service that computes it), dataset content hash, renderer and max_length, computed once from the frozen base
   weights and reused across epochs, resumes and sweeps (and per sequence across datasets that share texts);
2. `forward_backward_custom` with the pure DPO loss of `dpo_core.loss`; at step 0, while the adapter is still
   zero, the policy IS the reference, so a first-batch loss away from ln 2 stops the run (`ReferenceMismatchError`);
3. `optim_step`, submitted without waiting for step 2's result;
4. one metrics line; `state` + sampler weights every `save_every` steps and at the end (`final`).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tinker
import torch

from dpo_core import rendering
from dpo_core.checkpoints import append_jsonl, read_checkpoints, read_jsonl
from dpo_core.config import ConfigError, TrainConfig
from dpo_core.data import DatasetError, PreferencePair, held_out_split, pair_subset
from dpo_core.fsutil import atomic_write_bytes
from dpo_core.loss import TIE_TOLERANCE, dpo_loss, zero_margin_loss
from dpo_core.records import RunConfig, TrainOutcome
from dpo_core.reference import full_tokens, reference_id, reference_key, reference_logprobs, weighted_sum
from dpo_core.service import ServiceIdentity, identify

RENDERER_METADATA_KEY = "renderer_name"  # tinker_cookbook.checkpoint_utils.RENDERER_NAME_METADATA_KEY


class ReferenceMismatchError(RuntimeError):
    """At step 0 the policy's logprobs differ from the reference's: the reference was computed on other weights."""


class MetricsSink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...


@dataclass(frozen=True)
class RenderedPair:
    """Tokens and response-only weights of one pair, ready to become two datums (chosen first)."""

    chosen: tinker.Datum
    rejected: tinker.Datum
    num_tokens: int


def render_pairs(pairs: Sequence[PreferencePair], renderer: Any, max_length: int, source: str) -> list[RenderedPair]:
    """Render prompt+chosen / prompt+rejected with the cookbook's renderer and datum builder (token-sum
    weights on the response only), truncated to max_length; pairs identical after truncation are refused."""
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised.common import datum_from_model_input_weights

    def datum(conversation: list[dict]) -> tinker.Datum:
        model_input, weights = renderer.build_supervised_example(
            conversation, train_on_what=TrainOnWhat.LAST_ASSISTANT_MESSAGE)
        return datum_from_model_input_weights(model_input, weights, max_length, reduction="none")

    rendered = []
    for pair in pairs:
        chosen, rejected = datum(pair.chosen_conversation()), datum(pair.rejected_conversation())
        if full_tokens(chosen) == full_tokens(rejected):
            raise DatasetError(source, f"chosen and rejected become identical after truncation to "
                               f"max_length={max_length}", row=pair.row, column="chosen",
                               hint="raise max_length or drop the row")
        for column, each in (("chosen", chosen), ("rejected", rejected)):
            if float(each.loss_fn_inputs["weights"].to_numpy().sum()) == 0:
                raise DatasetError(source, f"the prompt alone fills max_length={max_length}: no {column} token "
                                   "left to train on", row=pair.row, column="prompt", hint="raise max_length")
        rendered.append(RenderedPair(chosen, rejected, chosen.model_input.length + rejected.model_input.length))
    return rendered


# ----------------------------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------------------------


def held_out_metrics(policy: np.ndarray, reference: np.ndarray, beta: float, loss_type: str = "sigmoid",
                     label_smoothing: float = 0.0, tokens: np.ndarray | None = None) -> dict[str, Any]:
    """Preference loss, accuracy and margin of `[n, 2]` (chosen, rejected) summed logprobs, plus the per-pair
    margins (so a report can put a CI on the accuracy). `dpo_loss` is the preference term of `loss_type`, as in
    the training metrics (`tokens` [n, 2]: response lengths, which ipo and sigmoid_norm need). Accuracy counts a
    pair won when chosen's reward is higher by more than `TIE_TOLERANCE` nats, half when the margin is within it
    (a tie: `ties` counts them), as the training loss's metric does: before training every margin is numeric
    noise, and noise is no win."""
    chosen_reward = beta * (policy[:, 0] - reference[:, 0])
    rejected_reward = beta * (policy[:, 1] - reference[:, 1])
    margins = chosen_reward - rejected_reward
    ties = np.abs(margins) <= TIE_TOLERANCE
    wins = margins > TIE_TOLERANCE
    as_tensor = lambda values: torch.as_tensor(np.asarray(values, dtype=np.float64))  # noqa: E731
    _, loss_metrics = dpo_loss(
        as_tensor(policy[:, 0]), as_tensor(policy[:, 1]), as_tensor(reference[:, 0]), as_tensor(reference[:, 1]),
        beta, loss_type=loss_type, label_smoothing=label_smoothing,
        tokens_chosen=None if tokens is None else as_tensor(tokens[:, 0]),
        tokens_rejected=None if tokens is None else as_tensor(tokens[:, 1]))
    return {"dpo_loss": loss_metrics["dpo_loss"], "loss_type": loss_type,
            "accuracy": float(np.mean(wins + 0.5 * ties)), "ties": int(ties.sum()),
            "margin": float(np.mean(margins)), "chosen_reward": float(np.mean(chosen_reward)),
            "rejected_reward": float(np.mean(rejected_reward)), "num_pairs": int(len(margins)),
            "margins": [float(m) for m in margins]}


def evaluate_held_out(training_client: Any, held_out: Sequence[RenderedPair], reference: np.ndarray,
                      config: TrainConfig) -> dict[str, Any]:
    """Held-out DPO metrics of the training client's current weights (called right after they are saved).

    A forward pass without gradients on the training client, not a sampling client of the saved path: the
    weights are the same, and the local server would otherwise keep one merged copy of the model per checkpoint
    (a run killed for memory at 8 GB on a shared 2-vCPU machine showed the cost)."""
    datums = [d for pair in held_out for d in (pair.chosen, pair.rejected)]
    outputs = training_client.forward(datums, "cross_entropy").result().loss_fn_outputs
    sums = [weighted_sum(d, out["logprobs"].to_numpy()) for d, out in zip(datums, outputs)]
    tokens = [float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in datums]
    return held_out_metrics(np.asarray(sums, dtype=np.float64).reshape(len(held_out), 2), reference,
                            config.dpo_beta, config.loss_type, config.label_smoothing,
                            np.asarray(tokens, dtype=np.float64).reshape(len(held_out), 2))


def _log_held_out(path: Path, name: str, step: int, metrics: dict[str, Any]) -> None:
    append_jsonl(path, {"name": name, "step": step, "split": "held_out", **metrics})


# ----------------------------------------------------------------------------------------------
# Schedule, registry, metrics files
# ----------------------------------------------------------------------------------------------


def learning_rate_at(config: TrainConfig, step: int, total_steps: int) -> float:
    progress = step / max(total_steps, 1)
    if config.lr_schedule == "linear":
        return config.learning_rate * (1.0 - progress)
    if config.lr_schedule == "cosine":
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate


def _check_schedule_continues(config: TrainConfig, run_dir: Path, n_batches: int, start_step: int,
                              total_steps: int) -> None:
    """A resumed run whose `num_epochs` changed keeps its learning rates only on a constant schedule: a decaying
    one is laid over the total step count, so the steps already taken followed another curve (a finished linear
    run ended near 0 and would jump back up). Refuse that with the ways out rather than train on a broken curve."""
    if not (run_dir / "config.json").exists():
        return
    before = RunConfig.read_train_config(run_dir).num_epochs
    if before == config.num_epochs or config.lr_schedule == "constant":
        return
    planned = n_batches * before
    raise ConfigError(
        f"{run_dir.name}: {start_step} of its {planned} steps were trained on a {config.lr_schedule} learning-rate "
        f"schedule over {planned} steps (num_epochs={before}); continuing to num_epochs={config.num_epochs} "
        f"({total_steps} steps) would move the learning rate at step {start_step} from "
        f"{learning_rate_at(config, start_step, planned):.3g} to {learning_rate_at(config, start_step, total_steps):.3g}. "
        f"Start a new run instead (resume=false, num_epochs={config.num_epochs}), or use lr_schedule=constant, "
        "which can be extended")


def planned_steps(config: TrainConfig, num_train_pairs: int) -> int:
    """Optimizer steps of a run on this many trained pairs: batches x epochs, capped at max_steps."""
    steps = math.ceil(num_train_pairs / config.batch_size) * config.num_epochs
    return min(steps, config.max_steps or steps)


def batch_indices(config: TrainConfig, num_train_pairs: int, step: int) -> list[int]:
    """The trained pairs of one step: each epoch is a seeded shuffle cut into batches (the last may be partial)."""
    epoch, batch = divmod(step, math.ceil(num_train_pairs / config.batch_size))
    order = list(range(num_train_pairs))
    random.Random(config.seed + epoch).shuffle(order)
    return order[batch * config.batch_size:(batch + 1) * config.batch_size]


def _rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def train(
    config: TrainConfig,
    service_client: tinker.ServiceClient,
    pairs: Sequence[PreferencePair],
    *,
    run_dir: Path,
    dataset_path: str,
    dataset_hash: str,
    reference_dir: Path,
    metrics_sinks: Sequence[MetricsSink] = (),
    service: ServiceIdentity | None = None,
) -> TrainOutcome:
    """Train one experiment into `run_dir` (config.json, metrics.jsonl, checkpoints.jsonl); resumes if possible.

    `service` is the identity of the service `service_client` talks to (`dpo_core.service.identify`, asked of
    the client when not given): the reference cache is keyed on it and config.json records it."""
    metrics_file, checkpoints_file = run_dir / "metrics.jsonl", run_dir / "checkpoints.jsonl"
    renderer_name = config.renderer_name or rendering.renderer_name_for(config.model_name)
    renderer = rendering.get_renderer(config.model_name, renderer_name)
    used = pair_subset(pairs, config.max_pairs, config.seed)
    subset = (config.max_pairs, config.seed) if len(used) < len(pairs) else None
    pairs = used
    all_rendered = render_pairs(pairs, renderer, config.max_length, dataset_path)
    train_rows, held_rows = held_out_split(pairs, config.held_out_fraction, config.held_out_min_pairs, config.seed)
    rendered = [all_rendered[i] for i in train_rows]
    n_batches = math.ceil(len(rendered) / config.batch_size)
    total_steps = planned_steps(config, len(rendered))

    service = service or identify(service_client, config.model_name)
    records = [r for r in read_checkpoints(run_dir) if r.state_path]
    last = records[-1] if records else None
    if last:
        _check_same_service(run_dir, service)
    start_step = last.step if last else 0
    if last and start_step >= total_steps:
        return TrainOutcome(run_dir=str(run_dir), steps=start_step, already_finished=True, final=last)
    if last:
        _check_schedule_continues(config, run_dir, n_batches, start_step, total_steps)
        _check_same_renderer(service_client, run_dir, last.state_path, renderer_name)
        if last.expired():
            raise ConfigError(last.expired_message(run_dir) + "; start a new run with resume=false")

    # A run from a checkpoint (an SFT model) starts from its weights and uses them as the reference, as the cookbook.
    start = config.load_checkpoint_path
    start_client = _start_from_checkpoint(service_client, config, renderer_name) if start and not last else None
    ref_id = reference_id(service, start)
    ref_file = reference_dir / (reference_key(ref_id, dataset_hash, renderer_name, config.max_length, subset)
                                + ".npy")
    reference_sampler = (lambda: (start_client or _start_from_checkpoint(service_client, config, renderer_name))
                         .save_weights_and_get_sampling_client().result()) if start else (
        lambda: service_client.create_sampling_client(base_model=config.model_name).result())
    # Over the whole dataset (the cache key is the dataset's), then split: the held-out rows are never trained on.
    all_reference = reference_logprobs(reference_sampler, ref_id, all_rendered, ref_file)
    reference, held_reference = all_reference[train_rows], all_reference[held_rows]
    held_out = [all_rendered[i] for i in held_rows]
    # The folder appears only once the inputs are known good: a refused dataset leaves nothing behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, config, dataset_path, dataset_hash, renderer_name, [pairs[i].row for i in held_rows],
                  [pair.row for pair in pairs] if subset else None, service)
    held_out_file = run_dir / "held_out.jsonl"

    if metrics_file.exists():
        # Steps logged after the last checkpoint (or before any) are redone: each step appears exactly once.
        _rewrite_jsonl(metrics_file, [m for m in read_jsonl(metrics_file) if m.get("step", -1) < start_step])
    if last:
        # Resume with optimizer state; the reference stays the original base model's (cached above).
        training_client = service_client.create_training_client_from_state_with_optimizer(
            last.state_path).result()
    else:
        # The renderer goes with the training run, as the cookbook stores it: a resume can check it there.
        training_client = start_client or service_client.create_lora_training_client(
            base_model=config.model_name, rank=config.lora_rank, seed=config.seed,
            user_metadata={RENDERER_METADATA_KEY: renderer_name}).result()
        if held_out:
            # Measured, not assumed: the untrained policy (adapter zero) against the cached reference, as at every
            # later checkpoint. Equal to the reference up to numeric noise only if the reference is right.
            _rewrite_jsonl(held_out_file, [])
            _log_held_out(held_out_file, "initial", 0,
                          evaluate_held_out(training_client, held_out, held_reference, config))

    step = start_step
    for step in range(start_step, total_steps):
        epoch = step // n_batches
        indices = batch_indices(config, len(rendered), step)
        data = [d for i in indices for d in (rendered[i].chosen, rendered[i].rejected)]
        ref = torch.tensor(reference[indices], dtype=torch.float64)

        def loss_fn(batch_data, logprobs_list, ref=ref):
            weights = [torch.tensor(d.loss_fn_inputs["weights"].to_numpy(), dtype=torch.float32) for d in batch_data]
            sums = torch.stack([(lp * w).sum() for lp, w in zip(logprobs_list, weights)])
            tokens = torch.stack([w.sum() for w in weights])
            return dpo_loss(sums[0::2], sums[1::2], ref[:, 0].to(sums.dtype), ref[:, 1].to(sums.dtype), config.dpo_beta,
                            loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                            nll_weight=config.nll_weight, tokens_chosen=tokens[0::2], tokens_rejected=tokens[1::2])

        started = time.time()
        lr = learning_rate_at(config, step, total_steps)
        backward = training_client.forward_backward_custom(data, loss_fn)
        if step == 0 and config.reference_check_tolerance:
            # The adapter is still zero: check the reference before the first update touches the weights.
            _check_reference_matches(backward.result().metrics, config, service, ref_file)
        optim = training_client.optim_step(tinker.AdamParams(
            learning_rate=lr, beta1=config.adam_beta1, beta2=config.adam_beta2, eps=config.adam_eps))
        loss_metrics = backward.result().metrics
        optim.result()
        metrics = {
            # Measured on the batch just trained on (before its update): "train_batch", unlike held_out.jsonl.
            "step": step, "epoch": epoch, "split": "train_batch",
            **{k: loss_metrics[k] for k in ("loss", "dpo_loss", "nll_loss", "margin_norm", "accuracy", "ties",
                                             "margin", "chosen_reward", "rejected_reward", "logps/chosen",
                                             "logps/rejected") if k in loss_metrics},
            "learning_rate": lr, "num_pairs": len(indices),
            "num_tokens": sum(rendered[i].num_tokens for i in indices),
            "progress": (step + 1) / total_steps, "time/step": time.time() - started,
            "time/start": started,  # wall clock (epoch s): when concurrent experiments' steps ran
        }
        append_jsonl(metrics_file, metrics)
        for sink in metrics_sinks:
            sink.log(metrics, step)
        done = step + 1
        name = "final" if done == total_steps else f"{done:06d}"
        saved = done == total_steps or bool(config.save_every and done % config.save_every == 0)
        if saved:
            _save_checkpoint(training_client, checkpoints_file, name, done, n_batches,
                             None if name == "final" else config.checkpoint_ttl)
        # eval_every = 0: at each saved checkpoint; else every eval_every steps and at the end, saved or not.
        if held_out and (done % config.eval_every == 0 or done == total_steps if config.eval_every else saved):
            _log_held_out(held_out_file, name, done,
                          evaluate_held_out(training_client, held_out, held_reference, config))
    return TrainOutcome(run_dir=str(run_dir), steps=total_steps, already_finished=False,
                        final=read_checkpoints(run_dir)[-1])


def _start_from_checkpoint(service_client: Any, config: TrainConfig, renderer_name: str) -> Any:
    """A training client on `load_checkpoint_path`'s weights (fresh optimizer), after checking that the checkpoint
    is of this run's base model and LoRA rank."""
    import warnings

    path = config.load_checkpoint_path
    with warnings.catch_warnings():  # create_rest_client is deprecated in 0.38 for RestClient(base_url, api_key)
        warnings.simplefilter("ignore", FutureWarning)
        info = service_client.create_rest_client().get_weights_info_by_tinker_path(path).result()
    if info.base_model != config.model_name or (info.lora_rank is not None and info.lora_rank != config.lora_rank):
        raise ConfigError(f"load_checkpoint_path {path} is a rank-{info.lora_rank} adapter of {info.base_model}; this "
                          f"run is model_name={config.model_name} lora_rank={config.lora_rank}: set both to the "
                          "checkpoint's")
    return service_client.create_training_client_from_state(
        path, user_metadata={RENDERER_METADATA_KEY: renderer_name}).result()


def _save_checkpoint(training_client: Any, checkpoints_file: Path, name: str, done: int, n_batches: int,
                     ttl_seconds: int | None) -> str:
    # Unique names per save: a rerun of a half-saved step writes new paths instead of colliding.
    suffix = f"{name}-{int(time.time() * 1000) % 10**9}"
    saved_at = time.time()
    state = training_client.save_state(suffix, ttl_seconds=ttl_seconds)
    sampler = training_client.save_weights_for_sampler(suffix, ttl_seconds=ttl_seconds)
    epoch, batch = divmod(done, n_batches)
    sampler_path = sampler.result().path
    append_jsonl(checkpoints_file, {
        "name": name, "epoch": epoch, "batch": batch, "step": done,
        "state_path": state.result().path, "sampler_path": sampler_path, "ttl_seconds": ttl_seconds,
        # Counted from before the request: the service's own clock starts later, so this errs early.
        "expires_at": None if ttl_seconds is None else saved_at + ttl_seconds,
    })
    return sampler_path


def _check_reference_matches(metrics: dict[str, float], config: TrainConfig, service: ServiceIdentity,
                             ref_file: Path) -> None:
    """Step 0, adapter zero: the policy is the reference, so every log-ratio is numeric noise, the mean margin ~0
    and the preference loss its zero-margin value (ln 2; (1/2β)² for ipo). Anything further off means the
    reference logprobs came from other weights.

    The loss tolerance is `reference_check_tolerance` in margin units: the sigmoid losses move by about half the
    mean margin, ipo's by 2·(1/2β)/β times the mean length-normalised margin."""
    loss, margin = metrics["dpo_loss"], metrics["margin"]
    tolerance = config.reference_check_tolerance
    expected = zero_margin_loss(config.loss_type, config.dpo_beta)
    loss_tolerance = tolerance / config.dpo_beta ** 2 if config.loss_type == "ipo" else tolerance
    if abs(loss - expected) <= loss_tolerance and abs(margin) <= 2 * tolerance:
        return
    raise ReferenceMismatchError(
        f"the reference does not match the policy's weights: at step 0, with the LoRA adapter still zero, the "
        f"first batch's {config.loss_type} DPO loss is {loss:.5f} (at zero margin it is {expected:.5f}) and its mean "
        f"margin {margin:.3g}, beyond reference_check_tolerance={tolerance:g}. The reference logprobs ({ref_file}) "
        f"were computed on other weights than {service.describe()}. Delete that file to recompute them; if this "
        "service's numerics are just that noisy (bf16 on long sequences), raise reference_check_tolerance (0 = no "
        "check)")


def _check_same_renderer(service_client: Any, run_dir: Path, state_path: str, renderer_name: str) -> None:
    """A resume renders with the renderer the run trained with: the one config.json records, and the one the
    training run's metadata holds on the service (where the service keeps it)."""
    recorded = {"config.json": RunConfig.read(run_dir).renderer_name if (run_dir / "config.json").exists() else None}
    with warnings.catch_warnings():  # create_rest_client: deprecated in favour of tinker.RestClient(...), in 0.38
        warnings.simplefilter("ignore", FutureWarning)
        try:
            run = service_client.create_rest_client().get_training_run_by_tinker_path(state_path).result()
            recorded["the training run's metadata"] = (run.user_metadata or {}).get(RENDERER_METADATA_KEY)
        except (tinker.TinkerError, ValueError):
            pass  # a service that does not say: config.json still does
    for where, name in recorded.items():
        if name is not None and name != renderer_name:
            raise ConfigError(f"{run_dir} was trained with renderer {name!r} ({where}); this run renders with "
                              f"{renderer_name!r}. Resume with renderer_name={name}, or start a new run "
                              "(resume=false)")


def _check_same_service(run_dir: Path, service: ServiceIdentity) -> None:
    """A run's checkpoints live on the service that trained it: resuming or reporting them elsewhere is refused."""
    recorded = RunConfig.read_service(run_dir)
    if recorded is not None and recorded.key() != service.key():
        raise ConfigError(
            f"{run_dir} was trained on {recorded.describe()}; this service is {service.describe()}. Its checkpoints "
            "and reference belong to the other service: rerun with resume=false (or another log_path) to train a "
            "new run here, or point the backend back at the first service")


def _write_config(run_dir: Path, config: TrainConfig, dataset_path: str, dataset_hash: str, renderer: str,
                  held_out_rows: list[int], pair_rows: list[int] | None, service: ServiceIdentity) -> None:
    from importlib.metadata import version

    record = RunConfig(
        train_config=config, dataset_path=dataset_path, dataset_sha256=dataset_hash, renderer_name=renderer,
        held_out_rows=held_out_rows, pair_rows=pair_rows, service=service.record(),
        versions={p: version(p) for p in ("dpo-suite", "tinker", "tinker-cookbook", "torch", "transformers")},
    )
    atomic_write_bytes(run_dir / "config.json", record.model_dump_json(indent=2).encode())
