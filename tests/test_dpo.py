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


GRADIENT_CASES = [("diffusion_dpo", "mean"), ("article", "mean"), ("ernie", "sum")]


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


class SmallVelocity(nnx.Module):
    """A small analytic velocity model with the DiT's call signature: `scale tanh(x) + bias + time t/1000 +
    (mean of the valid text tokens) @ text`, for the properties below (cheap, and any callable of that shape
    is a valid policy)."""

    def __init__(self, seed: int, channels: int = 3, height: int = 2, width: int = 3, text_dim: int = 4):
        rng = np.random.default_rng(seed)
        param = lambda *shape, mean=0.0: nnx.Param(jnp.asarray(rng.normal(mean, 0.5, shape), jnp.float32))
        self.scale = param(channels, 1, 1, mean=1.0)
        self.bias = param(channels, height, width)
        self.time = param(channels, 1, 1)
        self.text = param(text_dim, channels)

    def __call__(self, x, timestep, text_bth, text_lens):
        valid = jnp.arange(text_bth.shape[1])[None, :] < text_lens[:, None]
        pooled = jnp.sum(text_bth * valid[..., None], 1) / jnp.maximum(text_lens, 1)[:, None]
        time = self.time[...] * (timestep / 1000.0)[:, None, None, None]
        return self.scale[...] * jnp.tanh(x) + self.bias[...] + time + (pooled @ self.text[...])[..., None, None]


def small_inputs(pairs=3, seed=0, shape=(3, 2, 3), text_dim=4):
    rng = np.random.default_rng(seed)
    draw = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(latents_chosen=draw(pairs, *shape), latents_rejected=draw(pairs, *shape),
                text_bth=draw(pairs, 5, text_dim), text_lens=rng.integers(1, 6, pairs),
                noise=draw(pairs, *shape), sigmas=rng.uniform(0.05, 0.95, pairs).astype(np.float32),
                pair_weights=rng.uniform(0.2, 1.0, pairs).astype(np.float32))


def small(policy, reference, inputs, weighted=False, **options):
    keys = dpo.PAIR_KEYS + (("pair_weights",) if weighted else ())
    loss, metrics = dpo.dpo_loss(policy, reference, {k: inputs[k] for k in keys}, inputs["noise"], inputs["sigmas"],
                                 **options)
    return float(loss), {name: float(value) for name, value in metrics.items()}


@pytest.mark.parametrize("reduction", dpo.REDUCTIONS)
def test_policy_equal_to_reference_gives_logit_zero_and_log_two_plus_anchors(reduction):
    model, inputs = SmallVelocity(0), small_inputs()
    for variant in dpo.VARIANTS:
        loss, metrics = small(model, model, inputs, beta=3.0, lambda_win=0.35, lambda_lose=0.15, variant=variant,
                              reduction=reduction)
        assert metrics["reward_margin"] == 0.0 and metrics["implicit_accuracy"] == 0.0
        assert metrics["velocity_norm_ratio"] == pytest.approx(1.0, rel=1e-6)
        assert metrics["dpo_loss"] == pytest.approx(math.log(2), rel=1e-6)
        anchors = 0.35 * metrics["policy_chosen_error"] + 0.15 * metrics["policy_rejected_error"]
        assert loss == pytest.approx(math.log(2) + anchors, rel=1e-6)
        assert metrics["policy_chosen_error"] == metrics["reference_chosen_error"]


def test_sum_reduction_keeps_the_dpo_term_and_scales_errors_and_anchors_by_the_element_count():
    policy, reference, inputs = SmallVelocity(0), SmallVelocity(1), small_inputs()
    elements = inputs["latents_chosen"][0].size
    for variant in dpo.VARIANTS:
        options = dict(beta=2.0, lambda_win=0.35, lambda_lose=0.15, variant=variant)
        _, mean = small(policy, reference, inputs, reduction="mean", **options)
        loss, summed = small(policy, reference, inputs, reduction="sum", **options)
        assert abs(mean["reward_margin"]) > 0.05  # a real logit, not zero
        for name in ("dpo_loss", "reward_margin", "implicit_accuracy", "velocity_norm_ratio"):
            assert summed[name] == pytest.approx(mean[name], rel=1e-5, abs=1e-7), (variant, name)
        for name in METRICS:
            if name.endswith("_error"):
                assert summed[name] == pytest.approx(elements * mean[name], rel=1e-5), (variant, name)
        anchors = 0.35 * summed["policy_chosen_error"] + 0.15 * summed["policy_rejected_error"]
        assert loss == pytest.approx(summed["dpo_loss"] + anchors, rel=1e-6)


def test_variants_are_related_by_their_factors():
    """flow_dpo(beta) = ernie(beta / 2); with one sigma s for every pair, diffusion_dpo(beta) =
    flow_dpo((1 - s)^2 beta) (the epsilon error is (1 - s)^2 times the velocity error)."""
    policy, reference = SmallVelocity(0), SmallVelocity(1)
    inputs = small_inputs()
    _, flow = small(policy, reference, inputs, beta=4.0, variant="flow_dpo")
    _, ernie = small(policy, reference, inputs, beta=2.0, variant="ernie")
    assert abs(flow["reward_margin"]) > 0.05
    for name in METRICS:
        assert ernie[name] == pytest.approx(flow[name], rel=1e-6), name
    inputs["sigmas"] = np.full_like(inputs["sigmas"], 0.6)
    _, diffusion = small(policy, reference, inputs, beta=4.0, variant="diffusion_dpo")
    _, flow = small(policy, reference, inputs, beta=4.0 * 0.4 ** 2, variant="flow_dpo")
    _, unscaled = small(policy, reference, inputs, beta=4.0, variant="flow_dpo")
    assert abs(unscaled["reward_margin"] - diffusion["reward_margin"]) > 0.05
    for name in METRICS:
        assert diffusion[name] == pytest.approx(flow[name], rel=1e-5), name


def test_weighted_loss_is_linear_in_the_pair_weights():
    """`mean_b(w_b loss_b)`, not normalised by the weights' sum (which would not change when every weight is
    halved): the sum of one-hot-weighted losses is the weighted loss, and unit weights are no weights."""
    policy, reference, inputs = SmallVelocity(0), SmallVelocity(1), small_inputs()
    options = dict(beta=2.0, lambda_win=0.35, lambda_lose=0.15, variant="ernie")

    def weighted(weights):
        return small(policy, reference, dict(inputs, pair_weights=np.asarray(weights, np.float32)), weighted=True,
                     **options)

    loss, metrics = weighted(inputs["pair_weights"])
    one_hot = [weighted(np.eye(3)[i]) for i in range(3)]
    assert loss == pytest.approx(sum(w * l for w, (l, _) in zip(inputs["pair_weights"], one_hot)), rel=1e-6)
    assert metrics["dpo_loss"] == pytest.approx(
        sum(w * m["dpo_loss"] for w, (_, m) in zip(inputs["pair_weights"], one_hot)), rel=1e-6)
    assert weighted(inputs["pair_weights"] / 2)[0] == pytest.approx(loss / 2, rel=1e-6)
    unweighted, plain = small(policy, reference, inputs, **options)
    assert weighted(np.ones(3))[0] == pytest.approx(unweighted, rel=1e-6)
    assert abs(unweighted - loss) > 0.05
    # The other metrics are plain batch means, whatever the weights.
    for name in ("reward_margin", "implicit_accuracy", "policy_chosen_error", "velocity_norm_ratio"):
        assert metrics[name] == pytest.approx(plain[name], rel=1e-6), name


def fm_gradient(model, latents, inputs):
    """The gradient of flow_matching.py's loss (an independent path) on `latents` with the pairs' noise and
    sigmas."""
    graphdef, params = nnx.split(model)
    draw = flow_matching.NoiseDraw(jnp.asarray(inputs["noise"]), jnp.asarray(inputs["sigmas"]),
                                   jnp.zeros(len(latents), bool))
    return jax.grad(lambda p: flow_matching.flow_matching_loss(
        nnx.merge(graphdef, p), jnp.asarray(latents), inputs["text_bth"], inputs["text_lens"], draw)[0])(params)


@pytest.mark.parametrize("variant, dpo_factor", [("ernie", 0.5), ("flow_dpo", 0.25), ("article", 0.0)])
def test_gradient_at_the_reference_is_a_mix_of_the_two_flow_matching_gradients(variant, dpo_factor):
    """At policy = reference the logit is 0 and d(-log sigmoid z)/dz = -1/2, so the DPO term's gradient is
    (1/2) x beta (ernie; beta/2 for flow_dpo) x (grad E^w - grad E^l), E the flow-matching losses on the chosen and
    the rejected images; article's distances to the reference are at their minimum, so its DPO gradient is 0.
    The same module is passed as policy and reference: without the reference's stop_gradient the DPO term
    would be identically 0 and its gradient too. With the report's beta 0.05, lambda_win 0.35 and
    lambda_lose 0.15, the ernie loss starts as 0.375 grad E^w + 0.125 grad E^l: supervised learning on both
    images, the rejected included, when beta is in per-element-mean units (analysis section 8.4)."""
    model, inputs = SmallVelocity(0), small_inputs()
    beta, lambda_win, lambda_lose = 0.8, 0.35, 0.15
    graphdef, params = nnx.split(model)

    def loss(p):
        merged = nnx.merge(graphdef, p)
        batch = {k: inputs[k] for k in dpo.PAIR_KEYS}
        return dpo.dpo_loss(merged, merged, batch, inputs["noise"], inputs["sigmas"], beta=beta,
                            lambda_win=lambda_win, lambda_lose=lambda_lose, variant=variant)[0]

    grad = jax.grad(loss)(params)
    chosen = fm_gradient(model, inputs["latents_chosen"], inputs)
    rejected = fm_gradient(model, inputs["latents_rejected"], inputs)
    expected = jax.tree.map(lambda w, l: (dpo_factor * beta + lambda_win) * w + (lambda_lose - dpo_factor * beta) * l,
                            chosen, rejected)
    for actual_leaf, expected_leaf in zip(jax.tree.leaves(grad), jax.tree.leaves(expected), strict=True):
        assert relative_error(actual_leaf, expected_leaf) <= 1e-5


def test_article_variant_never_sees_the_targets():
    """Moving each pair's clean images by sigma d and its noise by -(1 - sigma) d leaves every model input
    x_sigma as it was but moves every target eps - x0 by -d. The article's loss does not change (it compares
    the policy with the reference, never with the data's targets), so nothing in it says which image was
    preferred beyond the inputs themselves; flow_dpo's does."""
    policy, reference, inputs = SmallVelocity(0), SmallVelocity(1), small_inputs()
    shift = np.random.default_rng(5).standard_normal(inputs["noise"].shape).astype(np.float32)
    sigma = inputs["sigmas"][:, None, None, None]
    moved = dict(inputs, latents_chosen=inputs["latents_chosen"] + sigma * shift,
                 latents_rejected=inputs["latents_rejected"] + sigma * shift,
                 noise=inputs["noise"] - (1 - sigma) * shift)
    for variant, changes in (("article", False), ("flow_dpo", True)):
        before = small(policy, reference, inputs, beta=4.0, variant=variant)[1]
        after = small(policy, reference, moved, beta=4.0, variant=variant)[1]
        if changes:
            assert abs(after["reward_margin"] - before["reward_margin"]) > 0.1
        else:
            assert after["reward_margin"] == pytest.approx(before["reward_margin"], rel=1e-4, abs=1e-6)
            assert after["dpo_loss"] == pytest.approx(before["dpo_loss"], rel=1e-5)


def test_bad_options_and_inputs_raise():
    model, inputs = SmallVelocity(0), small_inputs()
    for options, message in ((dict(variant="dpo"), "variant"), (dict(reduction="max"), "reduction"),
                             (dict(beta=0.0), "beta"), (dict(lambda_win=-0.1), "lambda_win"),
                             (dict(lambda_lose=-1.0), "lambda_lose")):
        with pytest.raises(ValueError, match=message):
            small(model, model, inputs, **{"beta": 1.0, **options})
        with pytest.raises(ValueError, match=message):
            dpo.DPOConfig(**{"beta": 1.0, **options})
    for key, value, message in (("latents_rejected", inputs["latents_rejected"][:, :2], "latents_rejected"),
                                ("noise", inputs["noise"][:2], "noise"), ("sigmas", inputs["sigmas"][:2], "sigmas"),
                                ("text_lens", inputs["text_lens"][:1], "text_lens"),
                                ("pair_weights", inputs["pair_weights"][:2], "pair_weights")):
        with pytest.raises(ValueError, match=message):
            small(model, model, dict(inputs, **{key: value}), weighted=True, beta=1.0)
    with pytest.raises(ValueError, match="batch lacks \\['text_lens'\\]"):
        dpo.dpo_loss(model, model, {k: inputs[k] for k in dpo.PAIR_KEYS[:3]}, inputs["noise"], inputs["sigmas"],
                     beta=1.0)


def test_objective_draws_from_each_pairs_key_and_splits_into_microbatches():
    objective = dpo.make(dpo.Config(beta=2.0, lambda_win=0.35, lambda_lose=0.15, variant="flow_dpo",
                                    weighted_pairs=True, sigmas={"sigma_scheme": "uniform", "shift": 3.0}))
    assert objective.config.sigmas == flow_matching.SigmaSampling(sigma_scheme="uniform", shift=3.0)
    assert objective.batch_keys == dpo.PAIR_KEYS + ("pair_weights",)
    assert (objective.trains, objective.reads) == (("transformer",), ("reference",))
    assert dpo.make(dpo.Config(beta=1.0)).batch_keys == dpo.PAIR_KEYS
    inputs = small_inputs(pairs=4)
    batch = {k: jnp.asarray(inputs[k]) for k in objective.batch_keys}
    models = dict(trainable={"transformer": SmallVelocity(0)}, frozen={"reference": SmallVelocity(1)})
    keys = example_keys(jax.random.key(7), 4)
    loss, metrics = objective.loss(batch=batch, keys=keys, **models)
    halves = [objective.loss(batch={k: v[part] for k, v in batch.items()}, keys=keys[part], **models)
              for part in (slice(0, 2), slice(2, 4))]
    assert float(loss) == pytest.approx(np.mean([float(l) for l, _ in halves]), rel=1e-6)
    for name in METRICS:
        assert float(metrics[name]) == pytest.approx(np.mean([float(m[name]) for _, m in halves]), rel=1e-5), name
    with pytest.raises(ValueError, match="batch lacks \\['pair_weights'\\]"):
        objective.loss(batch={k: batch[k] for k in dpo.PAIR_KEYS}, keys=keys, **models)
    other, _ = objective.loss(batch=batch, keys=example_keys(jax.random.key(8), 4), **models)
    assert abs(float(other) - float(loss)) > 1e-3
    with pytest.raises(ValueError, match="unknown DPO sigmas fields \\['scheme'\\]"):
        dpo.Config(beta=1.0, sigmas={"scheme": "uniform"})
    with pytest.raises(ValueError, match="sigma_scheme"):
        dpo.Config(beta=1.0, sigmas={"sigma_scheme": "lognorm"})


def test_sharded_dpo_update_equals_single_device():
    """One stabilized-DPO update (anchors, weighted pairs, errors summed over the latent) of a random tiny DiT
    policy against a frozen random reference on 4 emulated devices, fsdp=2 x tensor=2 (the policy and the
    reference split over both, the pairs over fsdp), against one device."""
    from tests.conftest import run_worker

    (result,) = run_worker("sharded_objectives.py", "dpo", "fsdp=2,tensor=2", devices=4).values()
    # The update is the warm-up's first, at lr 0: the Adam moments hold the gradient (measured 2.4e-6 on
    # fsdp=4 x tensor=2). At
    # lr > 0 the weights differ by up to 1e-4 relative: Adam's first step is lr x sign(gradient), and the
    # sign of a near-zero gradient element follows the order of the sharded sum.
    assert result["values"]["learning_rate"] == 0.0
    for part in ("metrics", "opt_state"):
        assert result[part] < 1e-5, (part, result[part], result.get("worst_metric"))
    # Weights split over fsdp x tensor ([1, 256, 512] gate_proj: embed -> fsdp, mlp -> tensor), 8 pairs over fsdp.
    assert result["kernel_shard"] == [1, 128, 256] and result["batch_shard"][0] == 4
    # The policy is not the reference: the DPO term and its implicit accuracy are not at their step-0 values.
    assert result["values"]["dpo_loss"] != pytest.approx(np.log(2)) and 0 < result["values"]["implicit_accuracy"] < 1

