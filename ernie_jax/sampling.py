"""Flow-matching Euler sampling with classifier-free guidance, as one compiled program.

Mirrors diffusers `FlowMatchEulerDiscreteScheduler` (shift, no dynamic shifting) driven the way
`ErnieImagePipeline.__call__` drives it: sigmas = shift(linspace(1, 0, N + 1)[:-1]) with a final 0,
the transformer fed t = sigma * 1000 in its dtype, CFG over the batch [uncond; cond], and the Euler
update x + (sigma_next - sigma) * v. The schedule is a host-side float32 array (computed exactly as
the reference computes it); the loop over steps is a `jax.lax.scan` inside one `jax.jit`.

For repeated calls from a notebook, hold the pure loop directly:

    graphdef, params = nnx.split(model)
    loop = jax.jit(functools.partial(denoise_loop, graphdef), static_argnames="use_cfg")
    latents = loop(params, latents, text_bth, text_lens, flow_match_sigmas(50, 4.0), 4.0, use_cfg=True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit.

    torch counts up from `start` for the first half and down from `end` for the rest, each value one
    fused multiply-add of the float32 step (a single rounding, reproduced here through float64, where
    the product is exact).
    """
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    index = np.arange(steps, dtype=np.float64)
    up = np.float64(np.float32(start)) + np.float64(step) * index
    down = np.float64(np.float32(end)) - np.float64(step) * (steps - 1 - index)
    return np.where(index < steps // 2, up, down).astype(np.float32)


def flow_match_sigmas(num_inference_steps: int, shift: float = 4.0) -> np.ndarray:
    """The scheduler's sigmas `[N + 1]` float32, ending in 0, for the ERNIE-Image pipeline's schedule."""
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    sigmas = _torch_linspace_float32(1.0, 0.0, int(num_inference_steps) + 1)[:-1]
    # numpy float32 arithmetic with a Python float, as the scheduler's set_timesteps does it.
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])


def cfg_combine(pred_uncond: jax.Array, pred_cond: jax.Array, guidance_scale) -> jax.Array:
    """pred_u + g * (pred_c - pred_u) in the prediction dtype (the product computed in fp32, rounded once)."""
    delta = (pred_cond - pred_uncond).astype(jnp.float32)
    return pred_uncond + (jnp.asarray(guidance_scale, jnp.float32) * delta).astype(pred_uncond.dtype)


def euler_step(latents: jax.Array, velocity: jax.Array, dt: jax.Array) -> jax.Array:
    """The scheduler's `(x.f32 + dt * v) -> v.dtype`.

    torch computes `dt * v` in v's dtype (a 0-dim fp32 tensor does not promote a bf16 tensor); only
    the add is fp32.
    """
    update = dt.astype(velocity.dtype) * velocity
    return (latents.astype(jnp.float32) + update.astype(jnp.float32)).astype(velocity.dtype)


def denoise_loop(graphdef, params, latents, text_bth, text_lens, sigmas, guidance_scale, *, use_cfg: bool):
    """The pure denoising loop: `latents [B, C, H, W]` at sigmas[0] -> latents at sigmas[-1] (= 0).

    With `use_cfg`, `text_bth [2B, T, D]` / `text_lens [2B]` hold the negative prompts first, then the
    positive ones, as the reference batches them; otherwise `[B, T, D]` / `[B]`.
    """
    model = nnx.merge(graphdef, params)
    dtype = model.dtype
    latents = latents.astype(dtype)
    sigmas = sigmas.astype(jnp.float32)
    timesteps = (sigmas[:-1] * 1000.0).astype(dtype)
    dts = sigmas[1:] - sigmas[:-1]

    def step(x, schedule):
        t, dt = schedule
        model_input = jnp.concatenate([x, x], axis=0) if use_cfg else x
        velocity = model(model_input, jnp.full((model_input.shape[0],), t, dtype), text_bth, text_lens)
        if use_cfg:
            pred_uncond, pred_cond = jnp.split(velocity, 2, axis=0)
            velocity = cfg_combine(pred_uncond, pred_cond, guidance_scale)
        return euler_step(x, velocity, dt), None

    latents, _ = jax.lax.scan(step, latents, (timesteps, dts))
    return latents


_denoise_loop_jit = jax.jit(denoise_loop, static_argnums=(0,), static_argnames=("use_cfg",))


def pad_text(text_bth: np.ndarray | jax.Array, length: int) -> jax.Array:
    """Zero-pads `[B, T, D]` text features to `[B, length, D]`."""
    text_bth = jnp.asarray(text_bth)
    return jnp.pad(text_bth, ((0, 0), (0, length - text_bth.shape[1]), (0, 0)))


def sample(
    model,
    latents,
    text_bth,
    text_lens,
    *,
    negative_text_bth=None,
    negative_text_lens=None,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    shift: float = 4.0,
    text_length_multiple: int = 1,
    mesh=None,
    rules=None,
) -> jax.Array:
    """Runs the reference pipeline's denoising loop and returns the final latents `[B, C, H, W]`.

    Same as `ErnieImagePipeline(..., output_type="latent", prompt_embeds=..., negative_prompt_embeds=...)`
    for the same initial `latents`. CFG runs when `guidance_scale > 1` and then needs the negative text
    features. Compiled once per shape and step count; the guidance scale is a runtime value. Padding the
    text to a multiple of `text_length_multiple` lets prompts of different lengths share one compiled
    program (padded keys are masked, so the result does not depend on it beyond float rounding).

    With a `mesh` (any jax Mesh with the project's axes) and logical-axis `rules` (see ernie_jax.parallel),
    the loop runs sharded: parameters
    placed by the rules, the batch split over the batch axes, activations pinned at block boundaries.
    """
    latents = jnp.asarray(latents)
    text_bth, text_lens = jnp.asarray(text_bth), jnp.asarray(text_lens)
    cfg = model.config
    batch = latents.shape[0]
    if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
        raise ValueError(f"latents {latents.shape} must be [B, {cfg.in_channels}, H, W]")
    if text_bth.ndim != 3 or text_bth.shape[0] != batch or text_lens.shape != (batch,):
        raise ValueError(f"text_bth {text_bth.shape} / text_lens {text_lens.shape} must be [{batch}, T, D] / [{batch}]")
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        if negative_text_bth is None or negative_text_lens is None:
            raise ValueError("guidance_scale > 1 needs negative_text_bth and negative_text_lens")
        negative_text_bth, negative_text_lens = jnp.asarray(negative_text_bth), jnp.asarray(negative_text_lens)
        if negative_text_bth.shape[0] != batch or negative_text_lens.shape != (batch,):
            raise ValueError(f"negative_text_bth {negative_text_bth.shape} / negative_text_lens "
                             f"{negative_text_lens.shape} must have batch {batch}")
        length = max(text_bth.shape[1], negative_text_bth.shape[1])
        text_bth = jnp.concatenate([pad_text(negative_text_bth, length), pad_text(text_bth, length)], axis=0)
        text_lens = jnp.concatenate([negative_text_lens, text_lens], axis=0)
    text_bth = pad_text(text_bth, -(-text_bth.shape[1] // text_length_multiple) * text_length_multiple)
    sigmas = flow_match_sigmas(num_inference_steps, shift)
    graphdef, params = nnx.split(model)
    args = (params, latents, text_bth.astype(model.dtype), text_lens, sigmas, jnp.float32(guidance_scale))
    if mesh is None:
        return _denoise_loop_jit(graphdef, *args, use_cfg=use_cfg)
    return _sharded_denoise_loop(graphdef, params, use_cfg, mesh, rules, tuple(a.shape for a in args[1:4]))(*args)


_SHARDED_LOOPS: dict = {}


def _sharded_denoise_loop(graphdef, params, use_cfg: bool, mesh, rules, shapes):
    """The loop compiled for one model structure, mesh, rule table and input shapes (latents, text, lengths),
    as a function that first places its arguments (params, latents, text, lengths, sigmas, guidance) in the
    loop's shardings."""
    from ernie_jax import parallel

    mesh = parallel.normalize_mesh(mesh)
    key = (graphdef, use_cfg, mesh, rules, shapes)
    if key not in _SHARDED_LOOPS:
        batch = [parallel.batch_sharding(mesh, rules, shape) for shape in shapes]
        replicated = parallel.replicated(mesh)
        in_shardings = (parallel.state_shardings(params, mesh, rules), *batch, replicated, replicated)
        loop = functools.partial(denoise_loop, graphdef, use_cfg=use_cfg)
        _SHARDED_LOOPS[key] = parallel.jit_sharded(loop, mesh, rules, in_shardings, batch[0]), in_shardings
    program, in_shardings = _SHARDED_LOOPS[key]
    return lambda *args: program(*parallel.put(args, in_shardings))
