"""Checks on what arrives over the wire, and the error type for requests a client must fix.

A `UserError` is answered as `{"error", "category": "user"}` (the SDK raises it and does not retry); any other
exception is a server fault. Every JSON route parses its body into one of the wire models below (the SDK's own
types plus ranges), so a wrong type, a missing field or a value out of range is a 400/422 naming the field,
never a 500. Checks that need a loaded model (token ids within the vocabulary, the context length) stay with
the piece that has it.

Caps (documented in docs/local-server.md, "Limits"): a prompt or datum fits the model's context, and so does
prompt + `max_tokens`; `num_samples` <= MAX_NUM_SAMPLES, `topk_prompt_logprobs` <= MAX_TOPK_PROMPT_LOGPROBS,
LoRA rank <= MAX_LORA_RANK, at most MAX_TAGS session tags of MAX_TAG_CHARS characters each, `learning_rate`
<= MAX_LEARNING_RATE; a JSON body nests at most MAX_JSON_DEPTH levels and its integers have at most
MAX_INT_DIGITS digits (checked before the body is decoded: deep nesting ends json's recursion in a
RecursionError, and Python refuses integers past 4300 digits with a ValueError; both were 500s).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import (AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, ValidationError,
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
# Adam moves each weight by about the learning rate per step: past 1 a step is no training, only damage (a
# finite 1e30 kept the weights finite and made every forward NaN). Steps under it are still checked (trainer.py).
MAX_LEARNING_RATE = 1.0
MAX_JSON_DEPTH = 32  # the SDK's deepest body (asample: prompt.chunks[].tokens[]) is 4 levels
MAX_INT_DIGITS = 20  # every integer a wire type takes fits in int64 (19 digits)


class UserError(Exception):
    """A request the client must fix (unknown model, bad path...). Reported, never retried."""

    status = 400


class WireError(UserError):
    """A request body that does not fit the wire types: names the field; 422 for a value, 400 for bad JSON."""

    def __init__(self, message: str, field: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


class UnknownSession(UserError):
    """A session id this server did not issue, or has released: 410, which also ends the SDK's heartbeat loop."""

    status = 410


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


def _small_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value)) > MAX_USER_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_USER_METADATA_BYTES} bytes as JSON")
    return value


UserMetadata = Annotated[dict[str, Any], AfterValidator(_small_metadata)]


class CreateSession(Wire):
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    user_metadata: UserMetadata | None = None


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
    user_metadata: UserMetadata | None = None  # the training run's, as Tinker keeps it (e.g. its renderer)


class Heartbeat(Wire):
    session_id: Id


class ModelRequest(Wire):
    """get_info and unload_model."""
    model_id: Id


class AdamParams(Wire):
    type: Literal["adamw", "adam"] = "adamw"
    learning_rate: float = Field(default=1e-4, ge=0, le=MAX_LEARNING_RATE)
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
    ttl_seconds: int | None = Field(default=None, ge=3600, le=10 * 366 * 24 * 3600)  # 1 hour to 10 years
    overwrite: bool = False

    @field_validator("path")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _checked_name(value)


class SaveWeightsExternal(SaveWeights):
    age_encryption_recipients: list[str] | None = None


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
    payload = load_json(raw)
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


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_LONG_DIGITS = re.compile(rb"\d{%d,}" % (MAX_INT_DIGITS + 1))
_KEY = re.compile(rb'"((?:[^"\\]|\\.)*)"\s*:', re.DOTALL)


class _LongInt:
    """What a too-long integer decodes to, so that its field can be named once the body is decoded."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def load_json(raw: bytes) -> Any:
    """Decode a JSON body whose nesting and integers are bounded first; a `WireError` naming the field if not."""
    if not raw.strip():
        return {}
    _check_depth(raw)
    long_ints = _LONG_DIGITS.search(raw) is not None  # digits inside strings match too: then nothing is found
    try:
        payload = json.loads(raw, parse_int=_bounded_int) if long_ints else json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"request body is not valid JSON: {exc}", "body", status=400) from None
    except (ValueError, RecursionError) as exc:  # not expected past the checks above: still the client's body
        raise WireError(f"request body cannot be decoded: {exc}", "body", status=400) from None
    if long_ints:
        found = _find(payload, lambda value: isinstance(value, _LongInt))
        if found is not None:
            path, value = found
            raise WireError(f"{path}: an integer of {value.digits} digits; integers have at most "
                            f"{MAX_INT_DIGITS}", path)
    return payload


def _bounded_int(text: str) -> int | _LongInt:
    return _LongInt(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _find(value: Any, wanted: Any, path: str = "") -> tuple[str, Any] | None:
    """The first value in a decoded body (bounded depth) for which `wanted` holds, with its dotted path."""
    if wanted(value):
        return path or "body", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _find(item, wanted, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _check_depth(raw: bytes) -> None:
    """Refuse a body nested deeper than MAX_JSON_DEPTH, naming its top-level field, without decoding it.

    Vectorised over the bytes (numpy), so a maximal body costs milliseconds: escapes become two inert bytes
    (offsets stay), unescaped quotes toggle "inside a string", brackets outside strings count the depth.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:  # cannot be deeper: the usual case, free
        return
    data = np.frombuffer(_ESCAPE.sub(b"__", raw), dtype=np.uint8)
    in_string = (np.cumsum(data == ord('"'), dtype=np.int32) & 1).astype(bool)
    delta = (data == ord("[")).astype(np.int32) + (data == ord("{")) - (data == ord("]")) - (data == ord("}"))
    delta[in_string] = 0
    depth = np.cumsum(delta, dtype=np.int32)
    too_deep = depth > MAX_JSON_DEPTH
    if not too_deep.any():
        return
    where = int(np.argmax(too_deep))
    field = "body"
    for match in _KEY.finditer(raw, 0, where):  # the last top-level key before that point
        if in_string[match.start()] and depth[match.start()] == 1:
            field = match.group(1).decode("utf-8", "replace")[:MAX_ID_CHARS]
    raise WireError(f"{field}: JSON nested deeper than {MAX_JSON_DEPTH} levels", field)
