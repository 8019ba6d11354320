"""`python -m ernie_jax.plan`: AOT memory plans on emulated devices (a 2-block model keeps it quick)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ernie_jax.models.dit import PRESETS

REPO = Path(__file__).resolve().parents[1]


def run_plan(*args):
    result = subprocess.run([sys.executable, "-m", "ernie_jax.plan", *args], check=False, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    values = dict(re.findall(r"^\s+(\S[^\d]*?)\s+(\d+\.\d+) GiB per device", result.stdout, re.MULTILINE))
    return {k.strip(): float(v) for k, v in values.items()}, result.stdout


def two_block_parameters() -> int:
    import dataclasses

    from ernie_jax.models.dit import abstract_transformer

    config = dataclasses.replace(PRESETS["full"], num_layers=2)
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract_transformer(config), nnx.Param)))


def test_train_plan_splits_parameters_and_adam_state():
    values, output = run_plan("--mode", "train", "--num-layers", "2", "--resolution", "256", "--batch", "8",
                              "--mesh", "fsdp=8", "--device-memory", "95GiB")
    expected = two_block_parameters() * 4 / 8 / 2**30  # fp32 master weights split 8 ways
    assert abs(values["parameters"] - expected) <= 0.02 * expected
    assert abs(values["optimizer state"] - 2 * values["parameters"]) <= 0.02 * values["optimizer state"]
    assert values["EMA weights"] == values["parameters"]  # the trainer's state keeps an fp32 EMA copy
    assert values["temporaries (activations, workspace)"] > 0
    assert "fits in 95.0 GiB" in output


def test_sample_plan_reports_when_it_does_not_fit():
    values, output = run_plan("--mode", "sample", "--num-layers", "2", "--resolution", "512", "--batch", "2",
                              "--mesh", "data=2", "--device-memory", "1GiB")
    assert abs(values["parameters"] - two_block_parameters() * 2 / 2**30) <= 0.02 * values["parameters"]
    assert "does NOT fit in 1.0 GiB" in output


def test_plan_rejects_bad_resolution():
    result = subprocess.run([sys.executable, "-m", "ernie_jax.plan", "--resolution", "1000"], check=False,
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "multiple of 16" in result.stderr


def plan_json(*args) -> dict:
    result = subprocess.run([sys.executable, "-m", "ernie_jax.plan", "--json", *args], check=False, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_offloaded_block_outputs_leave_the_device_total():
    common = ("--mode", "train", "--preset", "small", "--num-layers", "2", "--resolution", "256", "--batch", "8",
              "--mesh", "fsdp=8")
    kept = plan_json(*common, "--remat", "block_outputs")
    offloaded = plan_json(*common, "--remat", "offload_block_outputs")
    # Three [B, S, D] bf16 tensors per block: 2 blocks, 1 sample per device, 16x16 latent + 256 text tokens.
    config = PRESETS["small"]
    assert offloaded["offloaded to host"] == 3 * 2 * 1 * (16 * 16 + 256) * config.hidden_size * 2
    assert kept["offloaded to host"] == 0
    # XLA CPU ignores memory kinds: the same program, minus the offloaded bytes.
    assert offloaded["total"] == kept["total"] - offloaded["offloaded to host"]


def test_sample_plan_with_the_text_encoder_splits_both_models_over_fsdp():
    from ernie_jax.models import mistral

    report = plan_json("--mode", "sample", "--num-layers", "2", "--resolution", "256", "--batch", "1", "--mesh",
                       "fsdp=8", "--with-text-encoder")
    encoder = report["text encoder"]
    # bf16 weights of the real-size text encoder, split 8 ways by the default inference rules (norms whole).
    abstract = nnx.state(mistral.abstract_model(mistral.PRESETS["text_encoder"], encoder_only=True), nnx.Param)
    expected = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract)) * 2 / 8
    assert abs(encoder["parameters"] - expected) <= 0.01 * expected
    assert abs(report["parameters"] - two_block_parameters() * 2 / 8) <= 0.02 * report["parameters"]
    assert encoder["prompts"] == 2 and encoder["temporaries (activations, workspace)"] > 0
    # Each program's peak holds the other model's weights too; the plan is the larger peak.
    assert report["encoding peak"] == encoder["total"] + report["parameters"]
    assert report["total"] == max(report["denoising peak"], report["encoding peak"])
    assert report["denoising peak"] > report["parameters"] + encoder["parameters"]


def test_plan_with_the_text_encoder_is_for_sampling():
    result = subprocess.run([sys.executable, "-m", "ernie_jax.plan", "--mode", "train", "--with-text-encoder"],
                            check=False, cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "--with-text-encoder plans sampling" in result.stderr


def test_train_plan_compiles_the_trainers_update():
    """The trainer's step (training.step) on its state and batch: an EMA row, the float32 batch the frozen
    encoders produce as input, and the microbatch scan (XLA's cost analysis counts a loop body once)."""
    common = ("--mode", "train", "--preset", "tiny", "--num-layers", "1", "--resolution", "64", "--batch", "8",
              "--text-len", "16", "--mesh", "fsdp=2")
    whole, scanned = plan_json(*common), plan_json(*common, "--microbatches", "2")
    config = PRESETS["tiny"]
    assert scanned["EMA weights"] == scanned["parameters"] == whole["parameters"]
    # Per device (fsdp=2): float32 latents [8, 128, 4, 4] and text [8, 16, D], int32 lengths; plus the
    # state's step (int32) and RNG key (uint32[2]).
    batch = 8 * 128 * 4 * 4 * 4 + 8 * 16 * config.text_in_dim * 4 + 8 * 4
    assert scanned["inputs"] == batch // 2 + 4 + 8
    assert scanned["total"] == sum(scanned[k] for k in ("parameters", "optimizer state", "EMA weights", "inputs",
                                                      "temporaries (activations, workspace)", "outputs (not aliased)"))
    assert 0.4 < scanned["flops"] / whole["flops"] < 0.6


POST_TRAINING = ("--mode", "train", "--preset", "tiny", "--num-layers", "1", "--resolution", "64", "--batch", "8",
                 "--text-len", "16", "--mesh", "fsdp=2")


@functools.cache
def post_training_plan(*args) -> dict:
    return plan_json(*POST_TRAINING, *args)


def rows_sum(report: dict) -> int:
    return sum(report[k] for k in ("parameters", "optimizer state", "EMA weights", "frozen models", "inputs",
                                   "temporaries (activations, workspace)", "outputs (not aliased)"))


def test_dpo_plan_reads_a_bf16_reference_of_the_trained_dit():
    """Full DPO: the flow-matching train state plus a bf16 copy of the DiT in the same shardings (half the
    fp32 master weights' bytes), a batch of pairs, and the reference's forward pass on both images."""
    flow, dpo = post_training_plan(), post_training_plan("--objective", "dpo")
    assert flow["frozen models"] == 0
    for key in ("parameters", "optimizer state", "EMA weights"):
        assert dpo[key] == flow[key]
    assert dpo["frozen models"] == flow["parameters"] // 2
    config = PRESETS["tiny"]
    # Per device (fsdp=2): chosen and rejected float32 latents [8, 128, 4, 4], text [8, 16, D], lengths;
    # plus the state's step and RNG key.
    pairs = 2 * 8 * 128 * 4 * 4 * 4 + 8 * 16 * config.text_in_dim * 4 + 8 * 4
    assert dpo["inputs"] == pairs // 2 + 4 + 8
    assert dpo["total"] == rows_sum(dpo)
    # The policy's forward, recomputation and backward on 2B rows and the reference's forward on 2B rows,
    # against the same on B rows without a reference: (2 * 4 + 2) / 4.
    assert 2.2 < dpo["flops"] / flow["flops"] < 2.8


def test_lora_dpo_plan_trains_adapters_and_holds_the_base_once():
    """LoRA-DPO: fp32 adapters with their Adam moments and EMA, far below the whole DiT's; the base frozen
    in bf16, which is also the reference (the runner passes the same arrays): counted once."""
    rank = 4
    flow, dpo = post_training_plan(), post_training_plan("--objective", "dpo")
    lora_dpo = post_training_plan("--lora-rank", str(rank), "--objective", "dpo")
    config = PRESETS["tiny"]
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    # to_q, to_k, to_v, to_out.0 [D, D]; gate_proj, up_proj [D, F]; linear_fc2 [F, D]: A [in, r] and B [r, out].
    adapters = 4 * (4 * rank * 2 * hidden + 3 * rank * (hidden + ffn))
    assert adapters / 2 <= lora_dpo["parameters"] <= adapters  # fp32, some of them split over fsdp=2
    assert lora_dpo["EMA weights"] == lora_dpo["parameters"]
    assert abs(lora_dpo["optimizer state"] - 2 * lora_dpo["parameters"]) <= 16  # + Adam's step count
    assert lora_dpo["optimizer state"] < flow["optimizer state"] / 30
    assert lora_dpo["total"] == rows_sum(lora_dpo)
    # The bf16 base is the whole DiT in bf16, as full DPO's reference; the reference reads it: once, not twice.
    assert lora_dpo["frozen models"] == dpo["frozen models"] == flow["parameters"] // 2
    assert lora_dpo["inputs"] == dpo["inputs"]


def test_post_training_options_are_for_training():
    for args in (("--lora-rank", "4"), ("--objective", "dpo")):
        result = subprocess.run([sys.executable, "-m", "ernie_jax.plan", "--mode", "sample", *args], check=False,
                                cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0 and "plan training: use them with --mode train" in result.stderr
