"""Reference logprobs: the frozen reference model's summed response logprobs of every (chosen, rejected) pair.

Computed once per dataset and reference, cached on disk (`<cache_dir>/reference/<key>.npy`) and reused across
epochs, resumes and sweeps, and per sequence across datasets that share texts.

What a cached value was computed on is one value, the `reference_id`: the model name and the identity of the
service that computed it (backend, base URL or "local", the server's weights fingerprint, its dtype; see
`dpo_core.service`), so a rehearsal on the stand-in never answers for Tinker, nor one server's weights for
another's under the same name. Each cache file has a `.seqs.json` beside it with the key of every sequence
(reference_id, full token ids and response weights): a hit is used only when those keys equal the current ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpo_core.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    import tinker

    from dpo_core.service import ServiceIdentity
    from dpo_core.train import RenderedPair

log = logging.getLogger("dpo_core.reference")


def reference_id(service: ServiceIdentity, checkpoint_path: str | None = None) -> str:
    """What the reference logprobs are computed on: the base model as `service` serves it (its identity names the
    model), or, with `checkpoint_path`, those weights (a run that starts from a checkpoint uses it as reference)."""
    return json.dumps({"service": service.key(), **({"checkpoint": checkpoint_path} if checkpoint_path else {})},
                      sort_keys=True)


def reference_key(ref_id: str, dataset_hash: str, renderer_name: str, max_length: int,
                  subset: tuple[int, int] | None = None) -> str:
    """The cache file name of a dataset's reference logprobs; `subset` = (max_pairs, seed) when a run uses one."""
    raw = json.dumps([ref_id, dataset_hash, renderer_name, max_length, *([list(subset)] if subset else [])])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def full_tokens(datum: tinker.Datum) -> list[int]:
    """The whole sequence of a datum: its input plus the last target token."""
    return datum.model_input.to_ints() + [int(datum.loss_fn_inputs["target_tokens"].to_numpy()[-1])]


def sequence_key(ref_id: str, datum: tinker.Datum) -> str:
    """Everything a sequence's summed logprob depends on: the reference, the full token ids, the weights."""
    digest = hashlib.sha256(ref_id.encode() + b"\0")
    digest.update(np.asarray(full_tokens(datum), dtype=np.int64).tobytes())
    digest.update(np.asarray(datum.loss_fn_inputs["weights"].to_numpy(), dtype=np.float64).tobytes())
    return digest.hexdigest()[:32]


def reference_logprobs(sampling_client_for: Any, ref_id: str, rendered: Sequence[RenderedPair],
                       cache_file: Path) -> np.ndarray:
    """`[num_pairs, 2]` summed response logprobs (chosen, rejected) under the reference, cached on disk.

    `sampling_client_for()` builds the sampling client of the reference weights; it is called only when some
    sequence is not cached. A cache file is used only when its `.seqs.json` holds exactly the current sequence
    keys; otherwise the log says why and the values are recomputed. On a miss, sequences that another cache file
    of the same folder already holds under the same keys are reused: the shipped datasets pick from the same
    candidate pools, so 387 of the suite's 640 sequences are distinct."""
    keys = [[sequence_key(ref_id, pair.chosen), sequence_key(ref_id, pair.rejected)] for pair in rendered]
    cached = _verified_hit(cache_file, keys)
    if cached is not None:
        return cached
    known = _cached_sequences(cache_file.parent)
    missing: dict[str, tinker.Datum] = {}  # key -> datum: a sequence that occurs twice is computed once
    for pair, row in zip(rendered, keys):
        for datum, key in zip((pair.chosen, pair.rejected), row):
            if key not in known:
                missing.setdefault(key, datum)
    if missing:
        known.update(zip(missing, summed_datum_logprobs(sampling_client_for(), list(missing.values()))))
    values = np.asarray([[known[c], known[r]] for c, r in keys], dtype=np.float64).reshape(len(rendered), 2)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # The keys first: a reader pairs a `.seqs.json` with its `.npy` only when the shapes agree.
    atomic_write_bytes(sequences_file(cache_file), json.dumps(keys).encode())
    atomic_write_bytes(cache_file, _npy_bytes(values))
    return values


def _verified_hit(cache_file: Path, keys: list[list[str]]) -> np.ndarray | None:
    """The cached array when its stored sequence keys equal `keys`, else None (and the reason in the log)."""
    if not cache_file.exists():
        return None
    try:
        cached = np.load(cache_file)
        stored = json.loads(sequences_file(cache_file).read_text())
    except (OSError, ValueError) as exc:
        log.warning("reference cache %s is unreadable (%s): recomputing", cache_file.name, exc)
        return None
    if cached.shape != (len(keys), 2) or len(stored) != len(keys):
        log.warning("reference cache %s holds %d pairs, this run has %d: recomputing", cache_file.name,
                    len(stored), len(keys))
        return None
    differing = [i for i, (old, new) in enumerate(zip(stored, keys)) if list(old) != list(new)]
    if differing:
        log.warning("reference cache %s was computed for other sequences (%d of %d pairs differ, first pair %d: "
                    "other tokens, weights or reference): recomputing", cache_file.name, len(differing),
                    len(keys), differing[0])
        return None
    return cached


def sequences_file(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.stem + ".seqs.json")


def _cached_sequences(folder: Path) -> dict[str, float]:
    """Sequence key -> summed logprob, from every complete cache file in the folder (unreadable ones skipped)."""
    known: dict[str, float] = {}
    for seqs in folder.glob("*.seqs.json") if folder.is_dir() else ():
        try:
            keys = json.loads(seqs.read_text())
            values = np.load(seqs.with_name(seqs.name.removesuffix(".seqs.json") + ".npy"))
        except (OSError, ValueError):
            continue
        if values.shape != (len(keys), 2):
            continue
        for (chosen, rejected), (chosen_value, rejected_value) in zip(keys, values):
            known[chosen], known[rejected] = float(chosen_value), float(rejected_value)
    return known


def weighted_sum(datum: tinker.Datum, logprobs: Sequence[float] | np.ndarray) -> float:
    """A datum's summed logprob over its (response-only) weights."""
    return float(np.dot(np.asarray(logprobs, dtype=np.float64), datum.loss_fn_inputs["weights"].to_numpy()))


def summed_datum_logprobs(sampling_client: Any, datums: Sequence[tinker.Datum]) -> list[float]:
    """Each datum's response logprob sum (its weights) under the sampling client's weights, all in flight at once."""
    import tinker

    # The full sequence is input + last target; compute_logprobs returns [None, lp_1, ..., lp_n-1].
    futures = [sampling_client.compute_logprobs(tinker.ModelInput.from_ints(full_tokens(d))) for d in datums]
    return [weighted_sum(d, [0.0 if v is None else v for v in f.result()[1:]]) for d, f in zip(datums, futures)]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
