"""DPO training throughput: dpo-suite's loop over the local server (real tinker SDK, loopback) vs TRL's DPOTrainer.

    python bench/dpo_throughput.py              # SmolLM2-135M and local/tiny, 4 steps x 8 pairs, max_length 256
    python bench/dpo_throughput.py --smoke      # local/tiny, 2 steps x 2 pairs: seconds, keeps the script alive
    python bench/dpo_throughput.py --device cuda  # both arms on the GPU in bf16; reports peak CUDA memory too

Same model weights, the same first steps x batch pairs of dataset 2, LoRA rank 32 / alpha 32 on the same modules,
β 0.1, lr 1e-5, batch, max_length, torch threads and seed. Each arm runs in its own subprocess (so peak RSS is its
own), the arms alternate over --repeats rounds, and the ratio is the median of dpo-suite tok/s over TRL tok/s
(target >= 1.3, issue 16). Timed: the whole training call once the model is loaded: reference logprobs (dpo-suite computes
them once for the dataset from a cold cache; TRL's default recomputes them every step with the adapter disabled),
every step, and saving the final adapter. Tokens = prompt+chosen plus prompt+rejected tokens of the pairs trained
on, as each arm tokenised them (after truncation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _peak_memory(device: str) -> dict:
    """Peak host RSS, and on CUDA the peak memory torch allocated on the device (where the tensors live)."""
    peaks = {"peak_rss_mb": _peak_rss_mb()}
    if device == "cuda":
        import torch

        peaks["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def _torch_dtype(device: str, dtype: str):
    """The engine's rule for `auto` (`DPO_LOCAL_DTYPE`): bf16 on CUDA, fp32 on the CPU."""
    import torch

    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _pairs(count: int) -> list:
    from dpo_core import data

    pairs = data.load_pairs(ROOT / "data" / data.DATASET_FILES[2])
    if len(pairs) < count:
        raise SystemExit(f"dataset 2 has {len(pairs)} pairs; the benchmark needs {count}")
    return pairs[:count]


def arm_suite(model: str, steps: int, batch: int, max_length: int, threads: int, device: str, dtype: str) -> dict:
    """dpo_core.train.train through the tinker SDK against an in-process local server."""
    import tinker

    from dpo_core import rendering
    from dpo_core.config import TrainConfig
    from dpo_core.local.launcher import local_server
    from dpo_core.settings import Settings
    from dpo_core.train import train

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(local_threads=threads, local_storage=Path(tmp) / "storage", local_device=device,
                            local_dtype=dtype)
        rendering.register_models(settings.cache_dir, settings.local_models)
        pairs = _pairs(steps * batch)
        config = TrainConfig(model_name=model, dataset="2", learning_rate=1e-5, dpo_beta=0.1, batch_size=batch,
                             num_epochs=1, lora_rank=32, max_length=max_length, seed=0,
                             # TRL trains on every pair and evaluates nothing: so must this arm (the default
                             # holds 8 pairs out and scores them in the timed section)
                             held_out_fraction=0.0)
        with local_server(settings, storage=Path(tmp) / "storage") as server:
            with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as service:
                # Load the base model before the clock starts (TRL's arm also loads it untimed).
                service.create_sampling_client(base_model=model).result().compute_logprobs(
                    tinker.ModelInput.from_ints([1, 2, 3])).result()
                started = time.perf_counter()
                train(config, service, pairs, run_dir=Path(tmp) / "run", dataset_path="bench",
                      dataset_hash=f"bench-{time.time_ns()}", reference_dir=Path(tmp) / "reference")
                wall = time.perf_counter() - started
                metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "tokens": sum(m["num_tokens"] for m in metrics), "pairs": steps * batch,
            "steps": len(metrics), **_peak_memory(device)}


def arm_trl(model: str, steps: int, batch: int, max_length: int, threads: int, device: str, dtype: str) -> dict:
    """TRL DPOTrainer with a peft LoRA on the same weights, data, hyper-parameters, device and dtype."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpo_core import models
    from dpo_core.local.store import load_model
    from dpo_core.local.trainer import LORA_ALPHA, TARGETS_ATTN, TARGETS_MLP
    from dpo_core.settings import Settings

    torch.set_num_threads(threads)
    settings = Settings()
    torch_dtype = _torch_dtype(device, dtype)
    base = load_model(model, settings.cache_dir, settings.local_models, dtype=torch_dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(models.tokenizer_dir(model, settings.cache_dir,
                                                                       settings.local_models)))
    rows = [{"prompt": [dict(m) for m in p.prompt], "chosen": [dict(m) for m in p.chosen],
             "rejected": [dict(m) for m in p.rejected]} for p in _pairs(steps * batch)]
    lora = LoraConfig(r=32, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS_ATTN + TARGETS_MLP,
                      bias="none", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=batch, num_train_epochs=1, max_steps=steps,
            learning_rate=1e-5, beta=0.1, max_length=max_length, seed=0, use_cpu=device == "cpu",
            bf16=torch_dtype == torch.bfloat16, fp16=False,
            gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
            dataloader_num_workers=0, lr_scheduler_type="constant", optim="adamw_torch", disable_tqdm=True,
        )
        trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)
        dataset = trainer.train_dataset
        tokens = sum(min(len(r["prompt_ids"]) + len(r["chosen_ids"]), max_length)
                     + min(len(r["prompt_ids"]) + len(r["rejected_ids"]), max_length) for r in dataset)
        started = time.perf_counter()
        trainer.train()
        trainer.save_model(str(Path(tmp) / "final"))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "pairs": steps * batch, "steps": steps, **_peak_memory(device)}


ARMS = {"dpo-suite": arm_suite, "trl": arm_trl}


def run_arm(arm: str, model: str, steps: int, batch: int, max_length: int, threads: int, device: str,
            dtype: str) -> dict:
    """One arm in a fresh interpreter (its own peak RSS, no warm caches from the other arm)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--arm", arm, "--model", model, "--steps", str(steps),
               "--batch", str(batch), "--max-length", str(max_length), "--threads", str(threads),
               "--device", device, "--dtype", dtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{arm} arm failed ({model}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(model: str, steps: int, batch: int, max_length: int, threads: int, repeats: int, device: str,
            dtype: str) -> dict:
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for round_ in range(repeats):
        order = list(ARMS) if round_ % 2 == 0 else list(reversed(ARMS))
        for arm in order:
            results[arm].append(run_arm(arm, model, steps, batch, max_length, threads, device, dtype))
    summary = {}
    for arm, runs in results.items():
        summary[arm] = {"tok_s": statistics.median(r["tokens"] / r["wall_s"] for r in runs),
                        "wall_s": statistics.median(r["wall_s"] for r in runs),
                        "tokens": runs[0]["tokens"], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                        "runs_tok_s": [round(r["tokens"] / r["wall_s"], 1) for r in runs]}
        if "peak_cuda_mb" in runs[0]:
            summary[arm]["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in runs)
    ratios = [s["tokens"] / s["wall_s"] / (t["tokens"] / t["wall_s"])
              for s, t in zip(results["dpo-suite"], results["trl"])]
    summary["ratio"] = statistics.median(ratios)
    summary["ratios"] = [round(r, 2) for r in ratios]
    summary["memory_ratio"] = summary["dpo-suite"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]
    if "peak_cuda_mb" in summary["trl"]:
        summary["cuda_memory_ratio"] = summary["dpo-suite"]["peak_cuda_mb"] / summary["trl"]["peak_cuda_mb"]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="local/tiny, 2 steps x 2 pairs, max_length 64, 1 round")
    parser.add_argument("--models", default=f"{SMOLLM2},local/tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: 1 for local/tiny, 2 otherwise (both arms)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="both arms (default cpu)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="both arms; auto = bfloat16 on cuda, float32 on cpu (the engine's DPO_LOCAL_DTYPE rule)")
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from dpo_core.settings import apply_offline_env

    apply_offline_env()
    if args.arm:  # child process: one arm, one JSON line on stdout
        import logging

        logging.disable(logging.WARNING)
        result = ARMS[args.arm](args.model, args.steps, args.batch, args.max_length, args.threads, args.device,
                                args.dtype)
        print(json.dumps(result))
        return 0
    if args.smoke:
        args.models, args.steps, args.batch, args.max_length, args.repeats = "local/tiny", 2, 2, 64, 1
    for model in args.models.split(","):
        threads = args.threads or (1 if model == "local/tiny" else 2)
        result = compare(model, args.steps, args.batch, args.max_length, threads, args.repeats, args.device,
                         args.dtype)
        suite, trl = result["dpo-suite"], result["trl"]
        print(f"model {model}: {args.steps} steps x {args.batch} pairs, max_length {args.max_length}, "
              f"LoRA rank 32, beta 0.1, {threads} thread(s), {args.repeats} round(s), arms alternating, "
              f"{args.device} {_torch_dtype(args.device, args.dtype)}".replace("torch.", ""))
        for name, arm in (("dpo-suite (local server, tinker SDK)", suite), ("TRL DPOTrainer (peft LoRA)", trl)):
            print(f"  {name}: {arm['tok_s']:.0f} tok/s (median; runs {arm['runs_tok_s']}), {arm['tokens']} tokens, "
                  f"{arm['wall_s']:.1f} s, peak RSS {arm['peak_rss_mb']:.0f} MB"
                  + (f", peak CUDA {arm['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in arm else ""))
        print(f"  ratio dpo-suite/TRL tokens/s: {result['ratio']:.2f}x (per round {result['ratios']}; "
              f"target >= 1.3); peak memory ratio {result['memory_ratio']:.2f}x"
              + (f", peak CUDA memory ratio {result['cuda_memory_ratio']:.2f}x" if "cuda_memory_ratio" in result
                 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
