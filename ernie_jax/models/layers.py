"""Building blocks shared by the ERNIE-Image models: parameters with logical axes, norms, RoPE,
timestep sinusoids, attention dispatch and remat policies.

Every function here mirrors a specific PyTorch reference computation; the docstrings name it and
the rounding points that matter in bf16.
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.models import splash

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")

# Names (`jax.ad_checkpoint.checkpoint_name`) of the per-layer tensors that the block-output policies keep:
# the residual stream entering each stacked layer (named by `run_stacked`), and what each residual branch
# adds to it (named by the blocks, e.g. the DiT's attention and MLP outputs before their gates).
BLOCK_INPUT = "block_input"
BLOCK_BRANCH_OUTPUTS = ("attention_output", "mlp_output")
# Per policy, the names whose tensors it moves to host memory (each a `[B, S, D]` activation per layer).
REMAT_OFFLOADED_NAMES: dict[str, tuple[str, ...]] = {"offload_block_outputs": (BLOCK_INPUT, *BLOCK_BRANCH_OUTPUTS)}

REMAT_POLICIES: dict[str, Callable | None] = {
    # Keep every intermediate: fastest, most memory. The right choice for sampling.
    "none": jax.checkpoint_policies.everything_saveable,
    # Recompute the whole block in the backward pass; only block inputs are kept.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs that carry no batch dimension (weights-stationary projections).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep every matmul output, recompute the cheap elementwise work.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # Keep the block input and the branch outputs (three `[B, S, D]` tensors per layer) and recompute the
    # rest of the block. Under scan the block input is kept by every policy (it is the scanned carry), so
    # this differs from "full" by the branch outputs: the backward pass needs them only for the gates'
    # gradients, and keeping them spares recomputing the attention output projection and the MLP's down
    # projection (two of the block's seven weight matmuls).
    "block_outputs": jax.checkpoint_policies.save_only_these_names(BLOCK_INPUT, *BLOCK_BRANCH_OUTPUTS),
    # The same three tensors, moved to pinned host memory in the forward pass and back for the backward
    # pass, so no per-layer activation stays on the device. XLA's CPU backend drops the memory-kind
    # annotations (host and device memory are one there): on CPU this compiles and computes the same
    # numbers as "block_outputs", with the same memory.
    "offload_block_outputs": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=REMAT_OFFLOADED_NAMES["offload_block_outputs"],
        offload_src="device", offload_dst="pinned_host"),
}


# Set by ernie_jax.parallel.activation_sharding while a sharded program is traced: maps (array, logical
# axis names) to the array pinned to its mesh sharding. Unset, `constrain` is the identity, so models
# stay free of mesh details.
ACTIVATION_CONSTRAINT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "activation_constraint", default=None)


# Logical axes of attention's query, key and value `[B, T, H, D]`.
ATTENTION_AXES = ("batch", "length", "act_heads", None)

# Set by ernie_jax.parallel.activation_sharding while a sharded program is traced: maps
# (local_attention, ATTENTION_AXES, query, key, value, key_lengths, mask) to `local_attention(query, key,
# value, key_lengths, mask)` run per shard inside `shard_map`, keys and values gathered whole over the
# sequence axis. Unset, attention runs on whole arrays.
ATTENTION_SHARDING: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "attention_sharding", default=None)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pins activation `x` to the sharding of its logical axis `names` when a rule table is active."""
    constraint = ACTIVATION_CONSTRAINT.get()
    return x if constraint is None else constraint(x, names)


def remat_policy(name: str):
    """Returns the jax.checkpoint policy registered under `name`."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def check_build_settings(remat: str, attention_impl: str) -> None:
    """Refuses an unknown remat policy or attention implementation before a model builds anything."""
    remat_policy(remat)
    if attention_impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {attention_impl!r}")


def create_stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` copies of `make_layer(rngs)` as one module whose variables have a leading `layers` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs):
        return make_layer(layer_rngs)

    return make(rngs)


def run_stacked(stacked: nnx.Module, step, carry, per_layer=None, *, remat: str, scan: bool,
                num_layers: int | None = None):
    """Runs `step(layer, carry, per_layer_input) -> (carry, per_layer_output)` over the first `num_layers`
    (default all) stacked layers, each under `jax.checkpoint` with the named remat policy.

    `scan=True` is one `jax.lax.scan`; `scan=False` unrolls the same computation (for debugging and
    parity). `per_layer` is a pytree with a leading layer axis (or None); outputs are stacked likewise.
    """
    graphdef, state = nnx.split(stacked)
    if num_layers is not None:
        state = jax.tree.map(lambda a: a[:num_layers], state)

    def body(c, xs):
        layer_state, layer_input = xs
        # Every use of the carry goes through the name, so a policy that offloads it leaves no device copy.
        return step(nnx.merge(graphdef, layer_state), checkpoint_name(c, BLOCK_INPUT), layer_input)

    body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, carry, (state, per_layer))
    outputs = []
    for i in range(jax.tree.leaves(state)[0].shape[0]):
        carry, out = body(carry, jax.tree.map(lambda a, layer=i: a[layer], (state, per_layer)))
        outputs.append(out)
    stacked_outputs = None if outputs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outputs)
    return carry, stacked_outputs


def logical(initializer, axes: Sequence[str | None]):
    """Attaches logical axis names to an initializer's parameter.

    Mesh placement is decided later (parallel.py), so the variable must not be sharded eagerly.
    """
    return nnx.with_partitioning(initializer, tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """torch.nn.Linear as `[..., in] -> [..., out]`: kernel `[in, out]` (`[L, in, out]` when stacked), optional bias
    `[out]`, both cast to the compute `dtype`, the same program as nnx.Linear's.

    `lora` is the adapter slot: None, or a module `lora(x, y) -> y + delta(x)` that adds a low-rank update to the
    base output (ernie_jax.models.lora attaches it). It lives beside `kernel` and `bias`, so a model's base
    parameters keep the same paths with or without an adapter.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool, dtype,
                 param_dtype, rngs: nnx.Rngs):
        # torch.nn.Linear's default init (uniform in +-1/sqrt(in)), so fresh models have the reference's scale.
        bound = 1.0 / math.sqrt(in_features)
        uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        self.dtype = dtype
        self.kernel = nnx.Param(logical(uniform, axes)(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = (nnx.Param(logical(uniform, axes[1:])(rngs.params(), (out_features,), param_dtype))
                     if use_bias else nnx.data(None))
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        y = jax.lax.dot_general(x, self.kernel[...].astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y if self.lora is None else self.lora(x, y)


def linear(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str, str],
    use_bias: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
) -> Linear:
    """A dense layer `[..., in] -> [..., out]` whose kernel `[in, out]` carries logical `axes` (see `Linear`)."""
    return Linear(in_features, out_features, axes=axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


def conv(in_channels: int, out_channels: int, kernel_size: int, *, padding, stride: int = 1, dtype, param_dtype,
         rngs: nnx.Rngs) -> nnx.Conv:
    """torch.nn.Conv2d (with bias) on channels-last `[B, H, W, in] -> [B, H', W', out]`, HWIO kernel.

    `padding` is nnx.Conv's explicit `((top, bottom), (left, right))`. Initialised like torch (uniform in
    +-1/sqrt(fan_in)).
    """
    bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride, padding=padding,
                    dtype=dtype, param_dtype=param_dtype,
                    kernel_init=logical(uniform, (None, None, "conv_in", "conv_out")),
                    bias_init=logical(uniform, ("conv_out",)), rngs=rngs)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, `[..., D] -> [..., D]`, with the reference's rounding.

    The variance and normalisation are fp32. Two conventions exist in the reference:
    `round_before_scale=True` is diffusers' `RMSNorm` and HF Mistral's (normalised value rounded to
    the compute dtype, then multiplied by the weight in that dtype); `False` is `torch.nn.RMSNorm`
    (weight multiplied in fp32, one rounding at the end). They agree exactly in fp32.
    """

    def __init__(self, dim: int, *, eps: float, round_before_scale: bool, axis_name: str,
                 dtype, param_dtype):
        self.eps = eps
        self.round_before_scale = round_before_scale
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,),
                               eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.round_before_scale:
            return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm (affine) over channels-last `[B, ..., C] -> [B, ..., C]`.

    Statistics, normalisation and affine are fp32 and the result is rounded once to the compute dtype, as
    torch's kernels do for bf16 inputs. Groups are contiguous channel ranges, as in torch.
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float, *, dtype, param_dtype):
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        param = lambda init: nnx.Param(init((num_channels,), param_dtype), out_sharding=("norm",),
                                       eager_sharding=False)
        self.scale = param(jnp.ones)
        self.bias = param(jnp.zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, -1)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


def silu_fp32(x: jax.Array) -> jax.Array:
    """SiLU computed in fp32 and rounded once, as torch's kernel does for bf16 (jax.nn.silu on bf16 would
    round the sigmoid before the product)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Non-affine LayerNorm over the last axis, computed in fp32 and rounded once (F.layer_norm)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def fp32_constant(function: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """`function(x)` for fp32 `x`, evaluated in float64 and rounded once to fp32: the correctly rounded value.

    For the constants the references compute in fp32 from shapes alone (RoPE and timestep frequencies):
    backends' fp32 transcendentals are faithful, not correctly rounded (measured on 256-wide timestep
    frequencies: XLA's CPU exp misses the correctly rounded value by one ulp on 15 of 128, torch's on 2), so
    computing them in numpy at trace time gives the same bits on every backend, at no cost per call.
    """
    return function(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


def timestep_sinusoid(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """diffusers `get_timestep_embedding(flip_sin_to_cos=False, downscale_freq_shift=0)`: `[B] -> [B, dim]` fp32.

    Frequencies exp(-ln(max_period) * k / (dim/2)); output is [sin, cos] (sin first). The frequencies are
    the reference's fp32 constants, made by `fp32_constant` (timesteps near 1000 turn one ulp of frequency
    into ~3e-5 of sinusoid, the largest fp32 error a DiT forward had with XLA's own fp32 exp).
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    frequencies = fp32_constant(np.exp, exponent)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(frequencies)[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def axes_rope_angles(position_ids: jax.Array, axes_dim: Sequence[int], theta: float) -> jax.Array:
    """ERNIE-Image's 3-axis RoPE angles `[B, S, 3] -> [B, S, sum(axes_dim)]` in fp32.

    Per axis a: omega_a[k] = 1 / theta^(2k/d_a), the reference's fp32 constants (each of its fp32 steps,
    the division, the power and the reciprocal, rounded correctly; see `fp32_constant`). The axes' angles
    are concatenated (`[B, S, sum(axes_dim)/2]`) and every angle is duplicated in place
    (`repeat_interleave(2)`), which is what the reference's `stack([emb, emb], -1)` does.
    """
    angles = []
    for axis, axis_dim in enumerate(axes_dim):
        exponent = np.arange(0, axis_dim, 2, dtype=np.float32) / np.float32(axis_dim)
        omega = np.float32(1) / fp32_constant(lambda e: np.float64(theta) ** e, exponent)
        angles.append(position_ids[..., axis, None].astype(jnp.float32) * jnp.asarray(omega, jnp.float32))
    angles = jnp.concatenate(angles, axis=-1)
    return jnp.repeat(angles, 2, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on the first R channels of each head, `x * cos + rotate_half(x) * sin`, the rest passed through.

    x: `[B, T, H, D]`; cos, sin: `[B, T, R]` with R even and R <= D, in x's dtype (the references compute
    them in fp32 and round). rotate_half = concat(-x2, x1) over the halves of the R rotated channels, as
    diffusers' ERNIE-Image `apply_rotary_emb` does with `rope_axes_dim` summing to less than the head dim.
    With ERNIE's interleaved-duplicated angles, x[i] and x[i + R/2] turn by different angles: that is
    intentionally not a rotation (reference doc 1.3); with Mistral's cat(freqs, freqs) (R = D) it is the
    standard half-split RoPE.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > x.shape[-1]:
        raise ValueError(f"RoPE on {rotary_dim} channels needs an even count of at most the head dim "
                         f"{x.shape[-1]}")
    rotary, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = jnp.split(rotary, 2, axis=-1)
    rotated = rotary * cos[:, :, None, :] + jnp.concatenate([-x2, x1], axis=-1) * sin[:, :, None, :]
    return rotated if passed.shape[-1] == 0 else jnp.concatenate([rotated, passed], axis=-1)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_lengths: jax.Array | None,
    implementation: str = "xla",
    mask: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention `q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D]`, scale 1/sqrt(D).

    Keys at positions >= key_lengths[b] are masked (ERNIE-Image keeps the padded text at the end of
    the sequence, so a key-padding mask is a per-sample valid length). `mask` (boolean `[B, 1, T, S]`,
    True = attend) adds any other pattern, e.g. causal. K may divide H (grouped-query attention: query
    head h reads key head h // (H / K)). `implementation` selects the kernel: "xla" (portable
    reference), "cudnn" (fused, GPU only) or "splash" (Pallas, TPU; interpreted on CPU; key-padding mask
    only, see models/splash.py).

    Under `parallel.activation_sharding` the kernel runs per shard in `shard_map` (ATTENTION_SHARDING):
    batch and heads split as ATTENTION_AXES say, and with the sequence split (context parallelism) each
    shard keeps its queries and gathers all keys and values, so key positions and lengths stay global.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "splash" and mask is not None:
        raise ValueError("splash attention takes only the key-padding mask (key_lengths), not a mask array; "
                         "use 'xla' or 'cudnn' for masked (e.g. causal) attention")
    local = functools.partial(_attention_kernel, implementation=implementation)
    sharded = ATTENTION_SHARDING.get()
    if sharded is None:
        return local(query, key, value, key_lengths, mask)
    return sharded(local, ATTENTION_AXES, query, key, value, key_lengths, mask)


def _attention_kernel(query, key, value, key_lengths, mask, *, implementation: str) -> jax.Array:
    """`attention` on the arrays at hand (whole, or one shard's)."""
    lengths = None if key_lengths is None else key_lengths.astype(jnp.int32)
    if implementation == "splash":
        return splash.splash_attention(query, key, value, lengths)
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, key_value_seq_lengths=lengths, implementation=implementation)


class PatchEmbed(nnx.Module):
    """Conv2d(kernel=stride=p, no padding) as a matmul over patches, `[B, C, H, W] -> [B, N, D]`, tokens
    row-major, N = (H // p) (W // p); kernel HWIO `[p, p, C, D]`, bias optional (CLIP's has none). Like the
    convolution, it never reads the last H % p rows and W % p columns (SigLIP so400m: 384 px in patches of 14)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, *, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.dtype = dtype
        bound = 1.0 / (in_channels * patch_size * patch_size) ** 0.5
        uniform = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
        self.kernel = nnx.Param(logical(uniform, ("patch", "patch", "conv_in", "embed"))(
            rngs.params(), (patch_size, patch_size, in_channels, hidden_size), param_dtype))
        self.bias = (nnx.Param(logical(uniform, ("embed",))(rngs.params(), (hidden_size,), param_dtype))
                     if use_bias else nnx.data(None))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, c, h, w = x.shape
        p = self.patch_size
        h, w = h - h % p, w - w % p
        patches = x[:, :, :h, :w].astype(self.dtype).reshape(b, c, h // p, p, w // p, p)
        tokens = jnp.einsum("bcyixj,ijcd->byxd", patches, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            tokens = tokens + self.bias[...].astype(self.dtype)
        return tokens.reshape(b, (h // p) * (w // p), -1)
