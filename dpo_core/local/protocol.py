"""Wire encodings of tinker SDK 0.38: the SDK's own protobuf schema for forward/backward and sampling.

Request bodies of `forward_backward` arrive as `ForwardBackwardRequest` protobuf (zstd-compressed when the
client enables it); results of forward/backward and sampling must go back as protobuf, everything else is
JSON. See shared/TINKER_PROTOCOL.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from dpo_core.local.trainer import Datum
from dpo_core.local.validation import UserError

PROTOBUF = "application/x-protobuf"

_NUMPY_OF = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_STOP_REASON = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


def maybe_decompress(body: bytes, content_encoding: str | None) -> bytes:
    if content_encoding and "zstd" in content_encoding.lower():
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    return body


def _tensor(message: Any, name: str, index: int) -> np.ndarray:
    if message.HasField("sparse_csr"):
        raise UserError(f"datum {index}: sparse loss_fn_inputs['{name}'] is not supported by the local server")
    dtype = _NUMPY_OF.get(message.dtype)
    if dtype is None:
        raise UserError(f"datum {index}: unsupported dtype {message.dtype} for loss_fn_inputs['{name}']")
    return np.frombuffer(message.dense, dtype=dtype)


def decode_forward_backward(body: bytes) -> tuple[str, int, str, bool, list[Datum]]:
    """-> (model_id, seq_id, loss_fn, forward_only, datums)."""
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception as exc:
        raise UserError(f"malformed ForwardBackwardRequest protobuf: {exc}") from None
    data = []
    for index, datum in enumerate(request.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise UserError(f"datum {index}: only encoded_text chunks are supported by the local server")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        inputs = datum.loss_fn_inputs
        if "target_tokens" not in inputs:
            raise UserError(f"datum {index}: loss_fn_inputs needs 'target_tokens'")
        targets = _tensor(inputs["target_tokens"], "target_tokens", index).astype(np.int64)
        weights = (_tensor(inputs["weights"], "weights", index).astype(np.float32) if "weights" in inputs
                   else np.ones(len(targets), dtype=np.float32))
        data.append(Datum(tokens=tokens, target_tokens=targets, weights=weights))
    return request.model_id, request.seq_id, request.loss_fn or "cross_entropy", request.forward_only, data


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


def prompt_tokens(prompt: dict[str, Any]) -> list[int]:
    """A JSON ModelInput (`{"chunks": [{"type": "encoded_text", "tokens": [...]}]}`) -> token ids."""
    tokens: list[int] = []
    for chunk in (prompt or {}).get("chunks", []):
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise UserError(f"prompt chunk type {chunk.get('type')!r} is not supported by the local server")
        tokens.extend(int(t) for t in chunk.get("tokens", []))
    return tokens
