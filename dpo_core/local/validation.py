"""Checks on what arrives over the wire, and the error type for requests a client must fix.

A `UserError` is answered as `{"error", "category": "user"}` (the SDK raises it and does not retry); any other
exception is a server fault. Every JSON route parses its body into one of the wire models below (the SDK's own
types plus ranges), so a wrong type, a missing field or a value out of range is a 400/422 naming the field,
never a 500. Checks that need a loaded model (token ids within the vocabulary, the context length) stay with
the piece that has it.

Caps (documented in the README's "Server limits"): a prompt or datum fits the model's context, and so does
prompt + `max_tokens`; `num_samples` <= MAX_NUM_SAMPLES, `topk_prompt_logprobs` <= MAX_TOPK_PROMPT_LOGPROBS,
LoRA rank <= MAX_LORA_RANK, at most MAX_TAGS session tags of MAX_TAG_CHARS characters each.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, ValidationError,
                      field_validator, model_validator)

# Checkpoint names become folder names: no separators, no dot-only names, nothing after the last character
# (always matched in full: `$` alone would let a trailing newline through).
CHECKPOINT_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")

MAX_NUM_SAMPLES = 128
MAX_TOPK_PROMPT_LOGPROBS = 64
MAX_LORA_RANK = 256
MAX_TAGS = 64
MAX_TAG_CHARS = 256
MAX_USER_METADATA_BYTES = 16 * 1024
MAX_ID_CHARS = 256
MAX_PROMPT_CHUNKS = 4096
MAX_STOPS = 64
MAX_STOP_CHARS = 256
MAX_REQUEST_TOKENS = 1 << 20  # tokens of one forward_backward request, all datums together


class UserError(Exception):
    """A request the client must fix (unknown model, bad path...). Reported, never retried."""

    status = 400


class WireError(UserError):
    """A request body that does not fit the wire types: names the field; 422 for a value, 400 for bad JSON."""

    def __init__(self, message: str, field: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


W = TypeVar("W", bound=BaseModel)


def _checked_name(name: str) -> str:
    if not CHECKPOINT_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError("must be 1-128 letters, digits, '.', '_' or '-'")
    return name


def check_checkpoint_name(name: Any) -> str:
    try:
        return _checked_name(name if isinstance(name, str) else "")
    except ValueError:
        raise UserError(f"checkpoint name {name!r} must be 1-128 letters, digits, '.', '_' or '-'") from None


def check_loss_fn(loss_fn: str) -> str:
    if loss_fn != "cross_entropy":
        raise UserError(f"loss_fn {loss_fn!r} is not supported by the local server (supported: cross_entropy)")
    return loss_fn


def check_datums(data: list[Any]) -> list[Any]:
    """Every datum has at least one token, and one target token and one finite weight per input token."""
    if not data:
        raise WireError("data: forward_backward needs at least one datum", "data")
    total = 0
    for index, datum in enumerate(data):
        if not len(datum.tokens):
            raise WireError(f"data[{index}].model_input: needs at least one token", f"data[{index}].model_input")
        if len(datum.target_tokens) != len(datum.tokens) or len(datum.weights) != len(datum.tokens):
            raise WireError(f"data[{index}].loss_fn_inputs: target_tokens and weights must have one entry per "
                            f"input token ({len(datum.tokens)}), got {len(datum.target_tokens)} and "
                            f"{len(datum.weights)}", f"data[{index}].loss_fn_inputs")
        if min(datum.tokens) < 0 or (len(datum.target_tokens) and int(np.min(datum.target_tokens)) < 0):
            raise WireError(f"data[{index}]: token ids must be >= 0", f"data[{index}]")
        check_finite(datum.weights, f"data[{index}].loss_fn_inputs.weights")
        total += len(datum.tokens)
    if total > MAX_REQUEST_TOKENS:
        raise WireError(f"data: {total} tokens in one request, the cap is {MAX_REQUEST_TOKENS}", "data")
    return data


def check_finite(values: Any, field: str) -> None:
    """Non-finite numbers never reach the weights: refused where they enter."""
    array = np.asarray(values, dtype=np.float64)
    if array.size and not np.isfinite(array).all():
        raise WireError(f"{field}: must be finite numbers (found NaN or inf)", field)


def check_context(length: int, context: int, field: str, what: str = "tokens") -> None:
    if length > context:
        raise WireError(f"{field}: {length} {what} exceed the model's context length of {context}", field)


# ---------------------------------------------------------------------------------------------- wire models
# The SDK's own request types (tinker/types/*.py) are the reference for names and types; ranges are added here.
# Strict: a float is no integer (a rank of 2.5 or a seq_id of "1" is refused), NaN and inf are no floats.
# Unknown fields are ignored, so a newer SDK's additions do not break an older server.


class Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True,
                              protected_namespaces=())


Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
SeqId = Annotated[int, Field(ge=0, le=2**62)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Tag = Annotated[str, StringConstraints(max_length=MAX_TAG_CHARS)]


class CreateSession(Wire):
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    user_metadata: dict[str, Any] | None = None

    @field_validator("user_metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > MAX_USER_METADATA_BYTES:
            raise ValueError(f"must be at most {MAX_USER_METADATA_BYTES} bytes as JSON")
        return value


class LoraConfig(Wire):
    rank: int = Field(ge=1, le=MAX_LORA_RANK)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(Wire):
    type: Literal["adamw", "adam"] = "adamw"  # AdamW is the only optimizer served locally


class CreateModel(Wire):
    session_id: Id
    model_seq_id: SeqId
    base_model: Id
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None


class Heartbeat(Wire):
    session_id: Id


class ModelRequest(Wire):
    """get_info and unload_model."""
    model_id: Id


class AdamParams(Wire):
    type: Literal["adamw", "adam"] = "adamw"
    learning_rate: float = Field(default=1e-4, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=0.0, ge=0)


class OptimStep(Wire):
    model_id: Id
    seq_id: SeqId | None = None
    adam_params: AdamParams = Field(validation_alias=AliasChoices("adam_params", "optim_params",
                                                                  "optimizer_params"))


class SaveWeights(Wire):
    model_id: Id
    path: str | None = None
    seq_id: SeqId | None = None
    ttl_seconds: int | None = Field(default=None, ge=0)
    overwrite: bool = False

    @field_validator("path")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _checked_name(value)


class SaveWeightsForSampler(SaveWeights):
    sampling_session_seq_id: SeqId | None = None


class LoadWeights(Wire):
    model_id: Id | None = None
    session_id: Id | None = None
    model_seq_id: SeqId | None = None
    seq_id: SeqId | None = None
    path: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    optimizer: bool = False

    @model_validator(mode="after")
    def _target(self) -> LoadWeights:
        if self.model_id is None and (self.session_id is None or self.model_seq_id is None):
            raise ValueError("needs model_id, or session_id and model_seq_id (create from state)")
        return self


class WeightsInfo(Wire):
    tinker_path: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class CreateSamplingSession(Wire):
    session_id: Id
    sampling_session_seq_id: SeqId
    base_model: Id | None = None
    model_path: Annotated[str, StringConstraints(max_length=1024)] | None = None


class EncodedTextChunk(Wire):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[TokenId]


class ModelInput(Wire):
    chunks: list[EncodedTextChunk] = Field(max_length=MAX_PROMPT_CHUNKS)

    @property
    def tokens(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.tokens]

    @model_validator(mode="after")
    def _not_empty(self) -> ModelInput:
        if not any(chunk.tokens for chunk in self.chunks):
            raise ValueError("needs at least one token")
        return self


class SamplingParams(Wire):
    max_tokens: int | None = Field(default=None, ge=0)  # <= the model's context: checked with the model known
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1 - MAX_NUM_SAMPLES)  # sample i uses seed + i
    stop: Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)] | list[
        Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]] | list[TokenId] | None = Field(
        default=None, max_length=MAX_STOPS)
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = Field(default=-1, ge=-1)
    top_p: float = Field(default=1.0, gt=0, le=1)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return value


class Sample(Wire):
    num_samples: int = Field(default=1, ge=1, le=MAX_NUM_SAMPLES)
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: Id | None = None
    model_path: Annotated[str, StringConstraints(max_length=1024)] | None = None
    sampling_session_id: Id | None = None
    seq_id: SeqId | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(default=0, ge=0, le=MAX_TOPK_PROMPT_LOGPROBS)


class FutureRequest(Wire):
    """retrieve_future and cancel_future."""
    request_id: Id


def parse(model: type[W], raw: bytes) -> W:
    """A JSON request body -> its wire model; a `WireError` naming the field and its allowed range."""
    try:
        payload = json.loads(raw) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"request body is not valid JSON: {exc}", "body", status=400) from None
    if not isinstance(payload, dict):
        raise WireError("request body must be a JSON object", "body", status=400)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        shown = repr(error.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise WireError(f"{field}: {error['msg'].removeprefix('Value error, ')} (got {shown}){more}",
                        field) from None
