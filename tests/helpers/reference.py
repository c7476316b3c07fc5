"""A base model's reference logprobs through a test's own client, computed and cached as training does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def base_reference(service_client: Any, model_name: str, rendered: list, cache_file: Path) -> np.ndarray:
    from dpo_core.reference import reference_id, reference_logprobs
    from dpo_core.service import identify

    return reference_logprobs(lambda: service_client.create_sampling_client(base_model=model_name).result(),
                              reference_id(identify(service_client, model_name)), rendered, cache_file)
