"""The DPO objective: every variant and reduction against an independent PyTorch implementation around
diffusers' ErnieImageTransformer2DModel (loss, metrics, the policy's gradients), and properties derived by
hand on a small analytic velocity model."""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import ernie_jax
from conversions.key_table import to_state_dict
from conversions.transformer import key_table
from ernie_jax.training.objectives import dpo, example_keys, flow_matching
from tests.conftest import TINY, reference_transformer, relative_error

PAIRS, HEIGHT, WIDTH, TEXT_LENS = 2, 4, 4, (6, 3)
ELEMENTS = TINY["in_channels"] * HEIGHT * WIDTH
METRICS = ("loss", "dpo_loss", "implicit_accuracy", "reward_margin", "policy_chosen_error", "policy_rejected_error",
           "reference_chosen_error", "reference_rejected_error", "velocity_norm_ratio")


def torch_dpo(policy, reference, inputs, *, beta, lambda_win, lambda_lose, variant, reduction):
    """Written from the papers, not from dpo.py: Wallace et al.'s stacked winner/loser batch and epsilon
    predictions (`eps_hat = x_t + (1 - sigma) v`), flow_grpo's velocity form, the report's form without the 1/2,
    and the article's snippet. Returns the loss tensor (with the policy's graph) and the metrics."""
    chosen, rejected, text, text_lens, noise, sigmas, weights = (torch.from_numpy(inputs[k]) for k in (
        "latents_chosen", "latents_rejected", "text_bth", "text_lens", "noise", "sigmas", "pair_weights"))
    sigma = sigmas[:, None, None, None]
    x_chosen = (1 - sigma) * chosen + sigma * noise
    x_rejected = (1 - sigma) * rejected + sigma * noise
    model_inputs = (torch.cat([x_chosen, x_rejected]), torch.cat([sigmas, sigmas]) * 1000,
                    torch.cat([text, text]), torch.cat([text_lens, text_lens]))
    v_policy_w, v_policy_l = policy(*model_inputs, return_dict=False)[0].chunk(2)
    with torch.no_grad():
        v_reference_w, v_reference_l = reference(*model_inputs, return_dict=False)[0].chunk(2)

    def err(a, b):
        squared = ((a - b) ** 2).flatten(1)
        return squared.mean(1) if reduction == "mean" else squared.sum(1)

    target_w, target_l = noise - chosen, noise - rejected
    policy_w, policy_l = err(v_policy_w, target_w), err(v_policy_l, target_l)
    reference_w, reference_l = err(v_reference_w, target_w), err(v_reference_l, target_l)
    scale = beta / ELEMENTS if reduction == "sum" else beta
    if variant == "diffusion_dpo":
        def eps_err(x, v):
            return err(noise, x + (1 - sigma) * v)

        model_diff = eps_err(x_chosen, v_policy_w) - eps_err(x_rejected, v_policy_l)
        ref_diff = eps_err(x_chosen, v_reference_w) - eps_err(x_rejected, v_reference_l)
        inside = -0.5 * scale * (model_diff - ref_diff)
    elif variant == "flow_dpo":
        inside = -0.5 * scale * ((policy_w - reference_w) - (policy_l - reference_l))
    elif variant == "ernie":
        inside = -scale * ((policy_w - policy_l) - (reference_w - reference_l))
    else:
        inside = scale * (err(v_policy_l, v_reference_l) - err(v_policy_w, v_reference_w))
    dpo_terms = -F.logsigmoid(inside)
    loss = (weights * (dpo_terms + lambda_win * policy_w + lambda_lose * policy_l)).mean()
    norm = lambda v: torch.linalg.vector_norm(v.flatten(1), dim=1)
    ratio = torch.cat([norm(v_policy_w) / norm(v_reference_w), norm(v_policy_l) / norm(v_reference_l)]).mean()
    metrics = dict(loss=loss, dpo_loss=(weights * dpo_terms).mean(), implicit_accuracy=(inside > 0).float().mean(),
                   reward_margin=inside.mean(), policy_chosen_error=policy_w.mean(),
                   policy_rejected_error=policy_l.mean(), reference_chosen_error=reference_w.mean(),
                   reference_rejected_error=reference_l.mean(), velocity_norm_ratio=ratio)
    return loss, {name: float(value.detach()) for name, value in metrics.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torch policy, torch reference, our policy, our reference): the reference is the policy with every
    tensor perturbed by 30% of its spread, so that the two differ by much more than fp32 rounding."""
    policy = reference_transformer(seed=3)
    reference = copy.deepcopy(policy)
    torch.manual_seed(4)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.3 * param.std() * torch.randn_like(param))
    loaded = []
    for name, model in (("policy", policy), ("reference", reference)):
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        loaded.append(ernie_jax.load_transformer(folder, "float32"))
    return policy, reference, *loaded


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    shape = (PAIRS, TINY["in_channels"], HEIGHT, WIDTH)
    text = rng.standard_normal((PAIRS, max(TEXT_LENS), TINY["text_in_dim"])).astype(np.float32)
    for i, length in enumerate(TEXT_LENS):
        text[i, length:] = 0.0
    # The rejected images at twice the scale: the policy's and the reference's errors then differ between the
    # two images by far more than rounding, so the logit is not a difference of nearly equal numbers.
    return dict(latents_chosen=rng.standard_normal(shape).astype(np.float32),
                latents_rejected=2 * rng.standard_normal(shape).astype(np.float32),
                text_bth=text, text_lens=np.asarray(TEXT_LENS, np.int64),
                noise=rng.standard_normal(shape).astype(np.float32), sigmas=np.array([0.3, 0.8], np.float32),
                pair_weights=np.array([1.0, 0.5], np.float32))


OPTIONS = dict(beta=50.0, lambda_win=0.35, lambda_lose=0.15)
FP32_TOLERANCE = 1e-5
# dpo_loss and reward_margin are functions of the logit, which subtracts errors of nearly equal size (here the
# policy-reference gaps are ~3% of the errors, and their chosen-rejected difference ~0.3%): fp32 rounding of
# the errors (~1e-7 relative) reaches the logit amplified. Their error is measured against the size of the
# terms the logit subtracts, half x beta x the largest error: measured <= 6e-8 of it (relative to their own
# values, up to 1.1e-5 for dpo_loss and 3.5e-4 for diffusion_dpo's reward margin of 0.014).
LOGIT_TOLERANCE = 5e-7
# Per tensor, max |error| / max |torch's gradient|: measured <= 1.9e-5 (time_embedding.linear_1.weight).
GRADIENT_TOLERANCE = 1e-4


def ours(policy, reference, inputs, **options):
    batch = {k: inputs[k] for k in dpo.PAIR_KEYS + ("pair_weights",)}
    return dpo.dpo_loss(policy, reference, batch, inputs["noise"], inputs["sigmas"], **options)


@pytest.mark.parametrize("reduction", dpo.REDUCTIONS)
def test_loss_and_metrics_match_torch(models, inputs, reduction):
    torch_policy, torch_reference, policy, reference = models
    margins = []
    for variant in dpo.VARIANTS:
        _, expected = torch_dpo(torch_policy, torch_reference, inputs, variant=variant, reduction=reduction, **OPTIONS)
        _, actual = ours(policy, reference, inputs, variant=variant, reduction=reduction, **OPTIONS)
        assert set(actual) == set(METRICS)
        assert all(value.dtype == jnp.float32 and value.shape == () for value in actual.values())
        half = 0.5 if variant in ("diffusion_dpo", "flow_dpo") else 1.0
        beta = OPTIONS["beta"] / (ELEMENTS if reduction == "sum" else 1)
        logit_scale = half * beta * max(expected[k] for k in METRICS if k.endswith("_error"))
        for name in METRICS:
            if name in ("dpo_loss", "reward_margin"):
                assert abs(float(actual[name]) - expected[name]) <= LOGIT_TOLERANCE * logit_scale, (variant, name)
            else:
                assert relative_error(actual[name], expected[name]) <= FP32_TOLERANCE, (variant, name)
        margins.append(expected["reward_margin"])
    # The variants' logits really differ here (a mix-up of them would not pass unnoticed).
    assert min(abs(a - b) for i, a in enumerate(margins) for b in margins[i + 1:]) > 0.01


GRADIENT_CASES = [(variant, "mean") for variant in dpo.VARIANTS] + [("ernie", "sum")]


def test_policy_gradients_match_torch(models, inputs):
    torch_policy, torch_reference, policy, reference = models
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)

    def loss(params, variant, reduction):
        return ours(nnx.merge(graphdef, params, rest), reference, inputs, variant=variant, reduction=reduction,
                    **OPTIONS)[0]

    grads = jax.jit(lambda p: [jax.grad(loss)(p, *case) for case in GRADIENT_CASES])(params)
    for (variant, reduction), grad in zip(GRADIENT_CASES, grads, strict=True):
        torch_policy.zero_grad()
        torch_dpo(torch_policy, torch_reference, inputs, variant=variant, reduction=reduction, **OPTIONS)[0].backward()
        expected = {name: param.grad.numpy() for name, param in torch_policy.named_parameters()}
        actual = to_state_dict(key_table(policy.config), nnx.to_pure_dict(grad), policy.config.num_layers)
        assert actual.keys() == expected.keys()
        for name in expected:
            assert relative_error(actual[name], expected[name]) <= GRADIENT_TOLERANCE, (variant, reduction, name)
