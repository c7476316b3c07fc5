"""Wire encodings of tinker SDK 0.38: the SDK's own protobuf schema for forward/backward and sampling.

Request bodies of `forward_backward` arrive as `ForwardBackwardRequest` protobuf (zstd-compressed when the
client enables it); results of forward/backward and sampling must go back as protobuf, everything else is
JSON. See shared/TINKER_PROTOCOL.md.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from dpo_core.local.trainer import Datum
from dpo_core.local.validation import MAX_ID_CHARS, MAX_REQUEST_TOKENS, UserError, WireError, check_datums

PROTOBUF = "application/x-protobuf"

_NUMPY_OF = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_STOP_REASON = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
# Messages in one forward_backward body. Decoding costs ~60 bytes and ~0.4 us per message in one C call that
# holds the GIL: 64 MB of empty datums decoded into 32 M messages, 1.8 GB and 12 s with the server frozen. A
# datum is ~8 messages (input, chunk, text, two tensors and their map entries), so this admits ~8 K datums (a
# DPO step of 256 pairs sends 512); more are refused with "split it".
MAX_PROTOBUF_MESSAGES = 1 << 16
_SCAN_YIELD_EVERY = 512  # fields scanned between pauses that hand the GIL to the event loop


class BodyTooLarge(UserError):
    status = 413


def decompress_capped(body: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """A zstd request body, decompressed while counting: a small bomb never grows past `max_bytes`."""
    import zstandard

    if content_encoding.strip().lower() != "zstd":
        error = UserError(f"Content-Encoding {content_encoding!r} is not supported (identity or zstd)")
        error.status = 415
        raise error
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
        while chunk := reader.read(1 << 20):
            out += chunk
            if len(out) > max_bytes:
                raise BodyTooLarge(f"request body over {max_bytes} bytes once decompressed")
    except zstandard.ZstdError as exc:
        raise UserError(f"request body is not valid zstd: {exc}") from None
    return bytes(out)


def _tensor(message: Any, name: str, index: int) -> np.ndarray:
    if message.HasField("sparse_csr"):
        raise UserError(f"datum {index}: sparse loss_fn_inputs['{name}'] is not supported by the local server")
    dtype = _NUMPY_OF.get(message.dtype)
    if dtype is None:
        raise WireError(f"data[{index}].loss_fn_inputs.{name}: unsupported dtype {message.dtype}",
                        f"data[{index}].loss_fn_inputs.{name}")
    if len(message.dense) % np.dtype(dtype).itemsize:
        raise WireError(f"data[{index}].loss_fn_inputs.{name}: {len(message.dense)} bytes is not a whole number "
                        f"of {np.dtype(dtype).name} values", f"data[{index}].loss_fn_inputs.{name}")
    return np.frombuffer(message.dense, dtype=dtype)


def decode_forward_backward(body: bytes) -> tuple[str, int, str, bool, list[Datum]]:
    """-> (model_id, seq_id, loss_fn, forward_only, datums)."""
    request = pb.ForwardBackwardRequest()
    _check_message_count(body, request.DESCRIPTOR)
    try:
        request.ParseFromString(body)
    except Exception as exc:
        raise WireError(f"body: malformed ForwardBackwardRequest protobuf: {exc}", "body", status=400) from None
    token_bytes = sum(len(chunk.encoded_text.tokens) for datum in request.data for chunk in datum.model_input)
    if token_bytes // 4 > MAX_REQUEST_TOKENS:  # before any token becomes a Python int (36 bytes each)
        raise WireError(f"data: {token_bytes // 4} tokens in one request, the cap is {MAX_REQUEST_TOKENS}", "data")
    if not request.model_id or len(request.model_id) > MAX_ID_CHARS:
        raise WireError(f"model_id: must be 1-{MAX_ID_CHARS} characters", "model_id")
    if request.seq_id < 0:
        raise WireError(f"seq_id: must be >= 0 (got {request.seq_id})", "seq_id")
    data = []
    for index, datum in enumerate(request.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise UserError(f"datum {index}: only encoded_text chunks are supported by the local server")
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise WireError(f"data[{index}].model_input: token bytes must be whole int32 values",
                                f"data[{index}].model_input")
            tokens.extend(np.frombuffer(raw, dtype=np.int32).tolist())
        inputs = datum.loss_fn_inputs
        if "target_tokens" not in inputs:
            raise UserError(f"datum {index}: loss_fn_inputs needs 'target_tokens'")
        targets = _tensor(inputs["target_tokens"], "target_tokens", index).astype(np.int64)
        weights = (_tensor(inputs["weights"], "weights", index).astype(np.float32) if "weights" in inputs
                   else np.ones(len(targets), dtype=np.float32))
        data.append(Datum(tokens=tokens, target_tokens=targets, weights=weights))
    check_datums(data)
    return request.model_id, request.seq_id, request.loss_fn or "cross_entropy", request.forward_only, data


def _check_message_count(body: bytes, descriptor: Any) -> None:
    """Walk the protobuf wire format (no decoding) and refuse a body of more than MAX_PROTOBUF_MESSAGES messages.

    Costs one Python step per field, stops at the cap, and lets the GIL go between steps, unlike the decoder.
    """
    malformed = WireError("body: malformed ForwardBackwardRequest protobuf", "body", status=400)
    count, steps, stack = 0, 0, [(descriptor, 0, len(body))]
    try:
        while stack:
            message, pos, end = stack.pop()
            fields = message.fields_by_number
            while pos < end:
                steps += 1
                if steps % _SCAN_YIELD_EVERY == 0:
                    time.sleep(0)  # a switch interval (5 ms) per event-loop wakeup would add up to seconds
                key, pos = _varint(body, pos)
                wire_type = key & 7
                if wire_type == 0:
                    _, pos = _varint(body, pos)
                elif wire_type == 1:
                    pos += 8
                elif wire_type == 5:
                    pos += 4
                elif wire_type == 2:
                    length, pos = _varint(body, pos)
                    field = fields.get(key >> 3)
                    if field is not None and field.message_type is not None:
                        count += 1
                        if count > MAX_PROTOBUF_MESSAGES:
                            raise WireError(f"body: more than {MAX_PROTOBUF_MESSAGES} protobuf messages (datums, "
                                            "chunks, tensors) in one request: split it", "body")
                        stack.append((field.message_type, pos, pos + length))
                    pos += length
                else:  # groups (3, 4) are not in the SDK's schema; 6 and 7 do not exist
                    raise malformed
                if pos > end:
                    raise malformed
    except IndexError:
        raise malformed from None


def _varint(body: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = body[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def encode_forward_backward_output(logprobs: list[np.ndarray], metrics: dict[str, float]) -> bytes:
    """One ArrayRecord with `logprobs` as a BatchedTensor (byte offsets), plus metrics (`loss:sum`)."""
    output = pb.ForwardBackwardOutput()
    output.loss_fn_output_type = "ArrayRecord"
    record = output.loss_fn_outputs.add()
    record.num_datums = len(logprobs)
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    arrays = [np.asarray(lp, dtype=np.float32) for lp in logprobs]
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = np.cumsum([0] + [a.size * 4 for a in arrays], dtype=np.int64).tobytes()
    for key, value in metrics.items():
        output.metrics[key] = float(value)
    return output.SerializeToString()


def encode_sample_response(result: dict[str, Any]) -> bytes:
    response = pb.SampleResponse()
    for sequence in result["sequences"]:
        message = response.sequences.add()
        message.stop_reason = _STOP_REASON[sequence["stop_reason"]]
        message.tokens = np.asarray(sequence["tokens"], dtype=np.int32).tobytes()
        message.logprobs = np.asarray(sequence["logprobs"], dtype=np.float32).tobytes()
    if result.get("prompt_logprobs") is not None:
        response.prompt_logprobs = np.asarray(result["prompt_logprobs"], dtype=np.float32).tobytes()
    if result.get("topk_prompt") is not None:
        ids, values = result["topk_prompt"]
        response.topk_prompt_logprobs.token_ids = ids.tobytes()
        response.topk_prompt_logprobs.logprobs = values.tobytes()
        response.topk_prompt_logprobs.length, response.topk_prompt_logprobs.k = ids.shape
    return response.SerializeToString()
