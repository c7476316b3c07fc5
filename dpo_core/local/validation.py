"""Checks on what arrives over the wire, and the error type for requests a client must fix.

A `UserError` is answered as `{"error", "category": "user"}` (the SDK raises it and does not retry); any other
exception is a server fault. Checks that need no model (shapes, names, option values) belong here, at the
edge; checks that need a loaded model (token ids within the vocabulary) stay with the piece that has it.
"""

from __future__ import annotations

import re
from typing import Any

# Checkpoint names become folder names: no separators, no dot-only names.
CHECKPOINT_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class UserError(Exception):
    """A request the client must fix (unknown model, bad path...). Reported, never retried."""


def check_checkpoint_name(name: Any) -> str:
    if not isinstance(name, str) or not CHECKPOINT_NAME_RE.match(name) or name in (".", ".."):
        raise UserError(f"checkpoint name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return name


def check_optimizer(params: dict[str, Any]) -> dict[str, Any]:
    """The optimizer parameters of `optim_step`: AdamW is the only optimizer served locally."""
    if params.get("type", "adamw") not in ("adamw", "adam"):
        raise UserError(f"optimizer {params.get('type')!r} is not supported locally (AdamW only)")
    return params


def check_loss_fn(loss_fn: str) -> str:
    if loss_fn != "cross_entropy":
        raise UserError(f"loss_fn {loss_fn!r} is not supported by the local server (supported: cross_entropy)")
    return loss_fn


def check_datums(data: list[Any]) -> list[Any]:
    """Every datum has one target token and one weight per input token."""
    if not data:
        raise UserError("forward_backward needs at least one datum")
    for index, datum in enumerate(data):
        if len(datum.target_tokens) != len(datum.tokens) or len(datum.weights) != len(datum.tokens):
            raise UserError(f"datum {index}: target_tokens and weights must have one entry per input token "
                            f"({len(datum.tokens)}), got {len(datum.target_tokens)} and {len(datum.weights)}")
    return data
