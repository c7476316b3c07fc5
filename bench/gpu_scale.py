"""Issue 27's benchmark at the seed's scale: DPO (dpo-suite vs TRL) and sampling on Qwen3-shaped models.

    python bench/gpu_scale.py                            # CUDA: Qwen3 0.6B, 1.7B and 8B shapes, every section
    python bench/gpu_scale.py --sections dpo --shapes 1.7B
    python bench/gpu_scale.py --smoke                    # CPU, tiny shapes, seconds: CI keeps the script alive

The models are built from the real Qwen3 configurations (`QWEN3`, copied from the published config.json files, so
nothing is downloaded) with random bf16 weights: speed does not depend on the values. Sections:
- dpo: LoRA rank 32 (alpha 32, attention and MLP), 64 pairs x 1024 tokens per optimizer step (prompt 256 +
  response 768 each), beta 0.1. dpo-suite arm: the local server's engine in process, as the tinker SDK drives it
  (reference logprobs once through the sampler, then per step a forward-only pass, the DPO gradient computed by
  the client, a forward_backward with it as token weights, and an optimizer step); TRL arm: DPOTrainer with a peft
  LoRA on the same model and token ids, micro-batches by gradient accumulation. Each prints tokens/s over the
  timed steps (the first step is a warm-up), MFU = model FLOPs of the policy's forward and backward per token
  (2 x 2 x (non-embedding params + the unembedding) + attention) x tokens/s / the card's dense bf16 peak, and
  peak CUDA memory (peak RSS on the CPU).
- sampling: 16 prompts x k=8 = 128 rows x 64 tokens through the engine's sampler; tok/s against the HBM bound
  (each decode step reads every weight once plus the KV cache: rows x bandwidth / bytes per step).
The peak and bandwidth come from the device's name (`CARDS`) or from DPO_GPU_PEAK_TFLOPS / DPO_GPU_HBM_TBPS.
Each arm runs in its own process (its own peak memory); a failing arm is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("DPO_BENCH_TREE") or str(ROOT))

# The Qwen3 dense models' shapes (config.json of Qwen/Qwen3-0.6B, -1.7B, -8B); the rest is left at its default.
QWEN3 = {
    "0.6B": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "1.7B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8B": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}
# Dense bf16 peak (FLOP/s, no sparsity) and HBM bandwidth (bytes/s), by a substring of the device name.
CARDS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12), "L40S": (362e12, 0.864e12)}
LORA_RANK, BETA, LR = 32, 0.1, 1e-5


def card(device: str) -> tuple[str, float, float]:
    """(name, dense bf16 peak FLOP/s, HBM bytes/s) of the device; nan where unknown and not given."""
    import torch

    if device != "cuda":
        return "cpu", float("nan"), float("nan")
    name = torch.cuda.get_device_name(0)
    peak, bandwidth = next((v for k, v in CARDS.items() if k in name), (float("nan"), float("nan")))
    peak = float(os.environ.get("DPO_GPU_PEAK_TFLOPS", peak / 1e12)) * 1e12
    bandwidth = float(os.environ.get("DPO_GPU_HBM_TBPS", bandwidth / 1e12)) * 1e12
    return name, peak, bandwidth


def build_model(shape: str, device: str):
    """A Qwen3 causal LM of `shape` with random weights, bf16 on CUDA (fp32 on the CPU), in eval mode."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen3Config(**QWEN3[shape], attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    return model


def model_flops_per_token(shape: str, context: int) -> float:
    """Forward FLOPs per token: 2 x (non-embedding weights + the unembedding) + causal attention at `context`."""
    c = QWEN3[shape]
    attn_width = c["num_attention_heads"] * c["head_dim"]
    kv_width = c["num_key_value_heads"] * c["head_dim"]
    per_layer = c["hidden_size"] * (2 * attn_width + 2 * kv_width) + 3 * c["hidden_size"] * c["intermediate_size"]
    weights = c["num_hidden_layers"] * per_layer + c["vocab_size"] * c["hidden_size"]
    attention = c["num_hidden_layers"] * 2 * context * attn_width  # QK^T and AV, 2 FLOPs each, half masked
    return 2 * weights + attention


def weight_bytes(shape: str, bytes_per_value: int) -> float:
    c = QWEN3[shape]
    attn_width, kv_width = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = c["hidden_size"] * (2 * attn_width + 2 * kv_width) + 3 * c["hidden_size"] * c["intermediate_size"]
    return bytes_per_value * (c["num_hidden_layers"] * per_layer + c["vocab_size"] * c["hidden_size"])


def token_pairs(shape: str, pairs: int, prompt: int, response: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Random (prompt, chosen, rejected) token ids, the same for both arms."""
    import random

    rng = random.Random(0)
    vocab = QWEN3[shape]["vocab_size"]
    draw = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731
    return [(draw(prompt), draw(response), draw(response)) for _ in range(pairs)]


def _peaks(device: str) -> dict:
    import torch

    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        peaks["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ the arms (each in its own process)
def arm_dpo_suite(shape: str, steps: int, pairs: int, prompt: int, response: int, device: str) -> dict:
    import numpy as np
    import torch

    from dpo_core.local.engine import Datum, Engine
    from dpo_core.local.sampler import SampleRequest

    data = token_pairs(shape, pairs, prompt, response)
    with tempfile.TemporaryDirectory() as tmp:
        big = device == "cuda"
        engine = Engine(Path(tmp) / "storage", Path(tmp) / "cache", device=device,
                        dtype="bfloat16" if big else "float32", micro_batch_tokens=16384 if big else 4096,
                        graph_cache_tokens=(32768 if shape != "8B" else 16384) if big else 16384)
        engine.store._bases["bench/qwen3"] = build_model(shape, device)  # served as a loaded base model
        model_id = "bench:train:0"
        engine.create_model(model_id, "bench/qwen3", {"rank": LORA_RANK})
        sequences = [seq for p, c, r in data for seq in (p + c, p + r)]
        weights = [np.array([0.0] * (prompt - 1) + [1.0] * response, dtype=np.float32) for _ in sequences]

        def datums(token_weights):
            return [Datum(tokens=s[:-1], target_tokens=np.array(s[1:], dtype=np.int64), weights=w)
                    for s, w in zip(sequences, token_weights)]

        times = []
        _sync(device)
        started = time.perf_counter()
        # Reference logprobs once (dpo-suite caches them per dataset), through the sampler as compute_logprobs does.
        source = engine.sampler_source(None, "bench/qwen3", None)
        scored = engine.sample_batch(source, [SampleRequest(s, 1, {"max_tokens": 1, "stop": []}, prompt_logprobs=True)
                                              for s in sequences])
        reference = np.array([float(np.sum(r["prompt_logprobs"][prompt:])) for r in scored])
        _sync(device)
        reference_s = time.perf_counter() - started
        for _ in range(steps + 1):
            step_started = time.perf_counter()
            outputs, _ = engine.forward_backward(model_id, datums(weights), "cross_entropy", forward_only=True)
            policy = torch.tensor([float((lp * w).sum()) for lp, w in zip(outputs, weights)], dtype=torch.float64,
                                  requires_grad=True)
            ref = torch.tensor(reference, dtype=torch.float64)
            margin = BETA * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2]))
            torch.nn.functional.softplus(-margin).sum().backward()  # -log sigmoid(margin), summed over pairs
            grads = policy.grad.numpy()
            engine.forward_backward(model_id, datums([(-g * w).astype(np.float32) for g, w in zip(grads, weights)]),
                                    "cross_entropy", forward_only=False)
            engine.optim_step(model_id, {"learning_rate": LR})
            _sync(device)
            times.append(time.perf_counter() - step_started)
    tokens = sum(len(s) - 1 for s in sequences)
    return {"tokens_per_step": tokens, "step_s": times[1:], "reference_s": reference_s, **_peaks(device)}


def _word_tokenizer(vocab: int):
    """A tokenizer whose word "t<i>" is token i: TRL takes text, and the benchmark's data are token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t2", pad_token="t0", unk_token="t3",
                                   bos_token=None)


def arm_trl(shape: str, steps: int, pairs: int, prompt: int, response: int, device: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_core.local.trainer import LORA_ALPHA, TARGETS_ATTN, TARGETS_MLP

    data = token_pairs(shape, pairs, prompt, response)
    text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    # TRL appends EOS to each response: drop one response token so both arms train on the same length
    rows = [{"prompt": text(p), "chosen": text(c[:-1]), "rejected": text(r[:-1])} for p, c, r in data]
    micro = 4 if device == "cuda" else 2
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            times.append(time.perf_counter() - self.started)

    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS_ATTN + TARGETS_MLP,
                      bias="none", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=micro, gradient_accumulation_steps=pairs // micro,
                         max_steps=steps + 1, learning_rate=LR, beta=BETA, max_length=prompt + response, seed=0,
                         use_cpu=device == "cpu", bf16=device == "cuda", gradient_checkpointing=False,
                         report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                         lr_scheduler_type="constant", optim="adamw_torch", disable_tqdm=True)
        trainer = DPOTrainer(model=build_model(shape, device), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=_word_tokenizer(QWEN3[shape]["vocab_size"]), peft_config=lora,
                             callbacks=[StepClock()])
        tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                     for r in trainer.train_dataset)
        trainer.train()
    return {"tokens_per_step": tokens, "step_s": times[1:], **_peaks(device)}


def arm_sampling(shape: str, rows: int, k: int, tokens: int, prompt: int, device: str) -> dict:
    import random

    from dpo_core.local.engine import Engine
    from dpo_core.local.sampler import SampleRequest

    rng = random.Random(1)
    vocab = QWEN3[shape]["vocab_size"]
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt)] for _ in range(rows // k)]
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Path(tmp) / "storage", Path(tmp) / "cache", device=device,
                        dtype="bfloat16" if device == "cuda" else "float32")
        engine.store._bases["bench/qwen3"] = build_model(shape, device)
        source = engine.sampler_source(None, "bench/qwen3", None)
        params = {"max_tokens": tokens, "temperature": 1.0, "seed": 0, "stop": []}
        engine.sample_batch(source, [SampleRequest(p, k, params) for p in prompts])  # warm-up (and graph capture)
        _sync(device)
        started = time.perf_counter()
        results = engine.sample_batch(source, [SampleRequest(p, k, params) for p in prompts])
        _sync(device)
        wall = time.perf_counter() - started
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"sampling failed: {failed[0]}")
    return {"tokens": sum(len(s["tokens"]) for r in results for s in r["sequences"]), "wall_s": wall,
            **_peaks(device)}


ARMS = {"dpo-suite": arm_dpo_suite, "trl": arm_trl, "sampling": arm_sampling}


def run_arm(arm: str, shape: str, args: argparse.Namespace) -> dict | str:
    """One arm in a fresh interpreter: its result, or why it failed."""
    command = [sys.executable, __file__, "--arm", arm, "--shapes", shape, "--device", args.device,
               "--steps", str(args.steps), "--pairs", str(args.pairs), "--prompt", str(args.prompt),
               "--response", str(args.response), "--rows", str(args.rows), "--k", str(args.k),
               "--tokens", str(args.tokens)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.arm_timeout)
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory(result: dict) -> str:
    if "peak_cuda_mb" in result:
        return f"peak CUDA {result['peak_cuda_mb'] / 1024:.1f} GiB"
    return f"peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 steps of 4 pairs x 24 tokens")
    parser.add_argument("--sections", default="dpo,sampling")
    parser.add_argument("--shapes", default="0.6B,1.7B,8B")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=2, help="timed DPO steps (after one warm-up step)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=768)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--arm-timeout", type=float, default=600)
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.shapes, args.steps, args.pairs, args.prompt, args.response = "cpu", "smoke", 1, 4, 8, 16
        args.rows, args.k, args.tokens = 8, 2, 8
    if args.arm:  # child process: one arm, one JSON line on stdout
        import logging

        logging.disable(logging.WARNING)
        shape = args.shapes
        if args.arm == "sampling":
            result = arm_sampling(shape, args.rows, args.k, args.tokens, args.prompt, args.device)
        else:
            result = ARMS[args.arm](shape, args.steps, args.pairs, args.prompt, args.response, args.device)
        print(json.dumps(result))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (or --device cpu)")
    name, peak, bandwidth = card(args.device)
    print(f"device {name}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s, HBM {bandwidth / 1e12:.2f} TB/s; "
          f"torch {torch.__version__}")
    failures = 0
    sections = args.sections.split(",")
    for shape in args.shapes.split(","):
        if "dpo" in sections:
            context = args.prompt + args.response
            print(f"DPO {shape}: {args.pairs} pairs x {context} tokens per step, LoRA rank {LORA_RANK}, "
                  f"{args.steps} timed step(s) after a warm-up, {args.device}")
            speeds = {}
            for arm in ("dpo-suite", "trl"):
                result = run_arm(arm, shape, args)
                if isinstance(result, str):
                    print(f"  {arm}: {result}")
                    failures += 1
                    continue
                step_s = sum(result["step_s"]) / len(result["step_s"])
                tok_s = result["tokens_per_step"] / step_s
                mfu = 2 * model_flops_per_token(shape, context // 2) * tok_s / peak
                speeds[arm] = (tok_s, result)
                extra = f", reference once {result['reference_s']:.1f} s" if "reference_s" in result else ""
                print(f"  {arm}: {tok_s:,.0f} tok/s ({step_s:.2f} s/step), MFU {mfu:.1%}, {_memory(result)}{extra}")
            if len(speeds) == 2:
                (ours, ours_r), (theirs, theirs_r) = speeds["dpo-suite"], speeds["trl"]
                key = "peak_cuda_mb" if "peak_cuda_mb" in ours_r else "peak_rss_mb"
                print(f"  ratio dpo-suite/TRL: {ours / theirs:.2f}x tokens/s (target >= 1.3 on 1.7B), "
                      f"{ours_r[key] / theirs_r[key]:.2f}x peak memory (target <= 1)")
        if "sampling" in sections:
            result = run_arm("sampling", shape, args)
            if isinstance(result, str):
                print(f"sampling {shape}: {result}")
                failures += 1
                continue
            tok_s = result["tokens"] / result["wall_s"]
            context = args.prompt + args.tokens // 2
            c = QWEN3[shape]
            kv_bytes = args.rows * c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 2 * context
            bound = args.rows * bandwidth / (weight_bytes(shape, 2) + kv_bytes)
            print(f"sampling {shape}: {args.rows} rows ({args.rows // args.k} prompts x k={args.k}) x {args.tokens} "
                  f"tokens: {tok_s:,.0f} tok/s, {tok_s / bound:.1%} of the HBM bound ({bound:,.0f} tok/s), "
                  f"{_memory(result)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
