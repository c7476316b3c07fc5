"""The new training options through the *tinker* backend on the stand-in, as a user runs them: a public set by
name (HelpSteer3's schema, from a local file), a length-normalised loss with the RPO term, run control, the dry run
and the export round trip (PEFT adapter -> peft on the base model -> the service's logprobs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.tinker_path.conftest import QWEN3_8B, ROOT, run_entry

HELPSTEER3 = [{"context": [{"role": "user", "content": f"Name a colour, number {i}."}],
               "response1": f"Blue, {i}.", "response2": f"I do not know {i}.", "overall_preference": -1 - i % 3}
              for i in range(12)] + [{"context": [{"role": "user", "content": "Tie?"}], "response1": "a",
                                      "response2": "b", "overall_preference": 0}]
TRAIN = ["loss_type=sigmoid_norm", "nll_weight=0.1", "dpo_beta=2", "learning_rate=1e-2", "batch_size=3",
         "num_epochs=2", "max_steps=5", "adam_beta1=0.8", "adam_eps=1e-6", "eval_every=2", "held_out_fraction=0.25",
         "held_out_min_pairs=3", "max_length=64", "allow_few_steps=true", "lr_schedule=constant"]


@pytest.mark.minutes(4)
def test_public_set_loss_variant_dry_run_and_export_on_the_tinker_path(tinker_env, standin, cache_dir, tmp_path):
    source = tmp_path / "helpsteer3.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in HELPSTEER3))
    args = ["flows/train.py", f"model_name={QWEN3_8B}", f"dataset=helpsteer3:{source}", *TRAIN]

    # --- dry run: the plan, and nothing on the service ---
    dry = run_entry([*args, "dry_run=true"], tinker_env, ROOT, timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "loss sigmoid_norm: 5 steps on 9 pairs (3 held out)" in dry.stdout, dry.stdout
    assert not (tmp_path / "experiments").exists()

    # --- train: the tie is dropped and counted, the options reach config.json and the service ---
    done = run_entry(args, tinker_env, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [run_dir] = (tmp_path / "experiments").iterdir()
    assert run_dir.name.startswith("dataset-helpsteer3_qwen38b_lr0.01_beta2_sigmoid_norm_rpo0.1_")
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["train_config"]["loss_type"], saved["train_config"]["max_steps"]) == ("sigmoid_norm", 5)
    converted = Path(saved["dataset_path"])
    assert json.loads(converted.with_suffix(".json").read_text())["dropped"] == {"tie (overall_preference 0)": 1}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 5 and all("nll_loss" in m and "margin_norm" in m for m in metrics)
    held = [json.loads(line)["step"] for line in (run_dir / "held_out.jsonl").read_text().splitlines()]
    assert held[1:] == [2, 4, 5]

    # --- export through the SDK's download route, then peft on the stand-in's base model ---
    from dpo_core.local import standin as standin_models

    base = standin_models.model_dir(QWEN3_8B, cache_dir)  # the stand-in's Qwen3-8B: tiny weights, the real tokenizer
    out = tmp_path / "adapter"
    exported = run_entry(["-m", "dpo_core", "export", str(run_dir), "--out", str(out), "--base", str(base)],
                         tinker_env, ROOT, timeout=300)
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    import tinker
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                       str(out)).eval()
    tokens = list(range(100, 140))
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([tokens])).logits[0, :-1].double()
    ours = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()
    sampler_path = json.loads((run_dir / "checkpoints.jsonl").read_text().splitlines()[-1])["sampler_path"]
    with tinker.ServiceClient(base_url=standin.base_url, api_key=standin.api_key) as client:
        served = client.create_sampling_client(model_path=sampler_path).compute_logprobs(
            tinker.ModelInput.from_ints(tokens)).result()[1:]
    # float32 on both sides (the stand-in computes on the CPU): see tests/integration/test_export.py.
    assert np.max(np.abs(np.asarray(served) - ours)) < 1e-5

    # --- a second run from that checkpoint: its weights are the start and the reference (ln 2 at step 0) ---
    state_path = json.loads((run_dir / "checkpoints.jsonl").read_text().splitlines()[-1])["state_path"]
    follow = run_entry(["flows/train.py", f"model_name={QWEN3_8B}", f"dataset=helpsteer3:{source}",
                        f"load_checkpoint_path={state_path}", "max_steps=2", *TRAIN[4:6], *TRAIN[10:]],
                       tinker_env, ROOT)
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    [second] = [p for p in (tmp_path / "experiments").iterdir() if p != run_dir]
    first_step = json.loads((second / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first_step["dpo_loss"] - np.log(2)) < 1e-3 and abs(metrics[-1]["margin"]) > 1e-3
