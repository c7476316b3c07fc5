"""The one place that knows how session, training-model and sampler ids are spelled.

Tinker's convention: a training model is `{session_id}:train:{model_seq_id}` (it is also the training run id
in `tinker://` paths), a sampling session `{session_id}:sample:{seq}`. Everything a session created starts
with `{session_id}:`, which is how a finished session's leftovers are found.
"""

from __future__ import annotations

import re
import uuid

_RUN_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,200}")  # matched in full: `$` lets a newline through


def new_session_id() -> str:
    return "local-" + uuid.uuid4().hex[:12]


def training_model_id(session_id: str, model_seq_id: int | str) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampler_id(session_id: str, sampling_session_seq_id: int | str) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


def session_of(model_id: str) -> str:
    """The session that created a training model (or sampler)."""
    return model_id.split(":train:")[0].split(":sample:")[0]


def belongs_to(session_id: str, model_or_sampler_id: str) -> bool:
    return model_or_sampler_id.startswith(f"{session_id}:")


def is_valid_run_id(run_id: str) -> bool:
    """A training run id that is safe as one folder name."""
    return isinstance(run_id, str) and bool(_RUN_ID_RE.fullmatch(run_id)) and run_id not in (".", "..")
