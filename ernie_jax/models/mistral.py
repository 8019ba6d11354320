"""The Mistral / Ministral-3 decoder in Flax NNX: ERNIE-Image's text encoder and its prompt enhancer (PE).

One decoder serves both uses:
- text encoder (transformers `Mistral3Model.language_model`, a `MistralModel`): `encode` returns
  `hidden_states[-2]`, the residual stream after the first `num_hidden_layers - 1` layers, without the
  final norm. A model built with `encoder_only=True` holds only those layers (the last layer, the final
  norm and the head are never computed, so they are not built or loaded).
- PE (transformers `Ministral3ForCausalLM`): `__call__` gives logits; `generate` runs prefill plus a
  KV-cached decode loop with transformers' sampling (temperature -> top-k -> top-p -> multinomial).

The layers are stacked on a leading `layers` axis and run with `jax.lax.scan` under `jax.checkpoint`;
`scan_layers=False` runs the same parameters unrolled.

Shapes: B batch, T tokens, S cache length, D hidden size, H query heads, K key/value heads, Hd head dim,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.models import layers
from ernie_jax.models.compiled import compiled_method

# Per model_type defaults of the transformers config classes, for keys a config.json may leave out.
_HF_DEFAULTS = {
    "mistral": dict(num_key_value_heads=8, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6,
                    max_position_embeddings=4096 * 32, sliding_window=4096, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=None),
    "ministral3": dict(num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-5,
                       max_position_embeddings=262144, sliding_window=None, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=11),
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
DEFAULT_ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """transformers' `rope_parameters` dict (keys keep their HF names). Defaults are Ministral-3's YaRN."""

    rope_type: str = "yarn"  # "yarn" or "default"
    rope_theta: float = 1e6
    factor: float | None = 16.0
    original_max_position_embeddings: int | None = 16384
    beta_fast: float | None = 32.0
    beta_slow: float | None = 1.0
    mscale: float | None = 1.0
    mscale_all_dim: float | None = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float | None = 0.1


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """The decoder's text config (HF field names). Defaults are the released Ministral-3-3B PE's.

    `llama_4_query_scaling` is not an HF field: it records which transformers class runs the config.
    `Ministral3Attention` multiplies queries by the Llama-4 position scale; `MistralAttention` (what
    `Mistral3Model` builds for a text_config of model_type "mistral", i.e. ERNIE-Image's text encoder)
    does not, even when the rope dict carries `llama_4_scaling_beta`.
    """

    vocab_size: int = 131072
    hidden_size: int = 3072
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    rope_parameters: RopeParameters = RopeParameters()
    llama_4_query_scaling: bool = True
    sliding_window: int | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = 11

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        rope = self.rope_parameters
        checks = {
            "num_attention_heads must be a multiple of num_key_value_heads":
                self.num_attention_heads % self.num_key_value_heads == 0,
            "head_dim must be even": self.head_dim % 2 == 0,
            "num_hidden_layers must be at least 2 (the text encoder uses all but the last)":
                self.num_hidden_layers >= 2,
            f"rope_type must be 'default' or 'yarn', got {rope.rope_type!r}": rope.rope_type in ("default", "yarn"),
            "yarn RoPE needs original_max_position_embeddings":
                rope.rope_type != "yarn" or rope.original_max_position_embeddings is not None,
            "Llama-4 query scaling needs llama_4_scaling_beta and original_max_position_embeddings":
                not self.llama_4_query_scaling or (rope.llama_4_scaling_beta is not None
                                                   and rope.original_max_position_embeddings is not None),
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"bad Mistral config: {message}")

    @property
    def num_encoder_layers(self) -> int:
        """Layers behind `hidden_states[-2]`: all but the last."""
        return self.num_hidden_layers - 1

    @classmethod
    def from_hf_config(cls, values: dict[str, Any]) -> "MistralConfig":
        """From a transformers `config.json` dict: a `Mistral3Config` (nested `text_config`, the text
        encoder), or a `MistralConfig` / `Ministral3Config` (the PE). Raises ValueError naming the problem."""
        if "text_config" in values or values.get("model_type") == "mistral3":
            text = values.get("text_config")
            if not isinstance(text, dict):
                raise ValueError("Mistral3 config without a text_config object")
            values = {"model_type": "mistral", **text}  # Mistral3Config's text_config default model_type
        model_type = values.get("model_type")
        if model_type not in _HF_DEFAULTS:
            raise ValueError(f"text config model_type must be one of {sorted(_HF_DEFAULTS)}, got {model_type!r}")
        missing = [k for k in _REQUIRED_KEYS if k not in values]
        if missing:
            raise ValueError(f"{model_type} config lacks {', '.join(missing)}")
        merged = {**_HF_DEFAULTS[model_type], **values}
        if merged["hidden_act"] != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {merged['hidden_act']!r}")
        head_dim = merged["head_dim"] or merged["hidden_size"] // merged["num_attention_heads"]
        return cls(
            vocab_size=merged["vocab_size"], hidden_size=merged["hidden_size"],
            intermediate_size=merged["intermediate_size"], num_hidden_layers=merged["num_hidden_layers"],
            num_attention_heads=merged["num_attention_heads"],
            num_key_value_heads=merged["num_key_value_heads"] or merged["num_attention_heads"],
            head_dim=head_dim, rms_norm_eps=float(merged["rms_norm_eps"]),
            max_position_embeddings=merged["max_position_embeddings"],
            rope_parameters=_rope_from_hf(merged, model_type),
            llama_4_query_scaling=model_type == "ministral3",
            sliding_window=merged["sliding_window"], tie_word_embeddings=bool(merged["tie_word_embeddings"]),
            bos_token_id=merged["bos_token_id"], eos_token_id=merged["eos_token_id"],
            pad_token_id=merged["pad_token_id"])

    def to_hf_text_config(self) -> dict[str, Any]:
        """The transformers text config dict (model_type "ministral3" when the query scaling applies)."""
        rope = {k: v for k, v in dataclasses.asdict(self.rope_parameters).items() if v is not None}
        values = {k: getattr(self, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "head_dim",
                                                "rms_norm_eps", "max_position_embeddings", "sliding_window",
                                                "tie_word_embeddings", "bos_token_id", "eos_token_id",
                                                "pad_token_id")}
        if isinstance(values["eos_token_id"], tuple):
            values["eos_token_id"] = list(values["eos_token_id"])
        model_type = "ministral3" if self.llama_4_query_scaling else "mistral"
        return {"model_type": model_type, "hidden_act": "silu", "rope_parameters": rope, **values}

    def inverse_frequencies(self) -> tuple[np.ndarray, float]:
        """transformers' RoPE init: `(inv_freq [Hd/2] fp32, attention_factor)`, default or YaRN."""
        return rope_inverse_frequencies(self.rope_parameters, self.head_dim, self.max_position_embeddings)


def _rope_from_hf(values: dict[str, Any], model_type: str) -> RopeParameters:
    """Standardises the rope dict as transformers' `standardize_rope_params` does (legacy `rope_scaling`,
    `type`, top-level `rope_theta`, yarn's `original_max_position_embeddings` defaulting to the max)."""
    rope = values.get("rope_parameters") or values.get("rope_scaling")
    if rope is None:
        # Ministral3Config.__post_init__ fills its YaRN dict; MistralConfig has plain RoPE.
        rope = (dataclasses.asdict(RopeParameters()) if model_type == "ministral3" else
                {"rope_type": "default", "rope_theta": values.get("rope_theta", DEFAULT_ROPE_THETA)})
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", values.get("rope_theta", DEFAULT_ROPE_THETA))
    if rope_type == "yarn":
        rope.setdefault("original_max_position_embeddings",
                        values.get("original_max_position_embeddings", values["max_position_embeddings"]))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    rope.pop("max_position_embeddings", None)  # Ministral3's default dict repeats it; unused by RoPE
    fields = {f.name for f in dataclasses.fields(RopeParameters)}
    unknown = sorted(k for k in rope if k not in fields)
    if unknown:
        raise ValueError(f"rope_parameters has unsupported keys {unknown}")
    defaults = dict(factor=None, original_max_position_embeddings=None, beta_fast=None, beta_slow=None, mscale=None,
                    mscale_all_dim=None, llama_4_scaling_beta=None)
    return RopeParameters(rope_type=rope_type, **{**defaults, **rope})


def rope_inverse_frequencies(rope: RopeParameters, head_dim: int, max_position_embeddings: int
                             ) -> tuple[np.ndarray, float]:
    """`(inv_freq [head_dim/2] fp32, attention_factor)` as transformers' `_compute_default_rope_parameters`
    and `_compute_yarn_parameters` compute them, in fp32 step by step (the rounding of the reference).

    YaRN blends per dimension pair i: inv_freq = interp * ramp_i + extrap * (1 - ramp_i), with extrap =
    theta^(-2i/d), interp = extrap / factor and ramp rising linearly from 0 at dim `low` to 1 at dim `high`.
    """
    f32 = np.float32
    # torch's fp32 pow here is correctly rounded (numpy's fp32 pow is not): compute in fp64 and round once.
    exponents = (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)).astype(np.float64)
    pos_freqs = (np.float64(rope.rope_theta) ** exponents).astype(f32)
    inv_extrapolation = f32(1.0) / pos_freqs
    if rope.rope_type == "default":
        return inv_extrapolation, 1.0
    original_max = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original_max

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations):
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    inv_interpolation = f32(1.0) / (f32(factor) * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
    extrapolation_weight = f32(1) - ramp
    inv_freq = inv_interpolation * (f32(1) - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq.astype(f32), attention_factor


# The released ERNIE-Image text encoder (Mistral3Model's text_config: model_type "mistral") and PE
# (Ministral3ForCausalLM), reference sections 4/5, and the tiny test sizes of section 7.
PRESETS = {
    "text_encoder": MistralConfig(llama_4_query_scaling=False, pad_token_id=None),
    "pe": MistralConfig(),
    "tiny_text_encoder": MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       llama_4_query_scaling=False, pad_token_id=None),
    "tiny_pe": MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32),
}


def rope_cos_sin(positions: jax.Array, inv_freq, attention_factor: float, dtype
                 ) -> tuple[jax.Array, jax.Array]:
    """`[B, T]` int positions -> (cos, sin) `[B, T, Hd]`: angles pos * inv_freq in fp32 laid out as
    cat(freqs, freqs) (standard half-split RoPE), scaled by the attention factor, rounded to `dtype`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    scale = jnp.float32(attention_factor)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def llama_4_query_scale(positions: jax.Array, beta: float, original_max_position_embeddings: int, dtype
                        ) -> jax.Array:
    """Ministral-3's `get_llama_4_attn_scale`: `[B, T]` -> `1 + beta * ln(1 + floor(pos / original_max))`,
    computed in fp32 and rounded to the query dtype; `[B, T, 1, 1]`."""
    ratio = positions.astype(jnp.float32) / jnp.float32(original_max_position_embeddings)
    scale = 1 + jnp.float32(beta) * jnp.log(1 + jnp.floor(ratio))
    return scale.astype(dtype)[:, :, None, None]


def attention_mask(query_positions: jax.Array, kv_lengths: jax.Array, num_keys: int,
                   sliding_window: int | None) -> jax.Array:
    """Boolean `[B, 1, T, S]`: key s is visible to the query at position p iff s <= p (causal), s < kv_length
    (key padding) and, with a sliding window w, s > p - w (transformers' sliding_window_overlay)."""
    keys = jnp.arange(num_keys)[None, None, :]
    queries = query_positions[:, :, None]
    mask = (keys <= queries) & (keys < kv_lengths[:, None, None])
    if sliding_window is not None:
        mask &= keys > queries - sliding_window
    return mask[:, None]


class Attention(nnx.Module):
    """GQA self-attention with RoPE, optional Llama-4 query scale and an optional KV cache, `[B, T, D] -> [B, T, D]`."""

    def __init__(self, config: MistralConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.attention_impl = attention_impl
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = layers.linear(d, self.num_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = layers.linear(d, self.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = layers.linear(d, self.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = layers.linear(self.num_heads * hd, d, axes=("heads", "embed"), **kw)

    def __call__(self, x, rope, query_scale, mask, cache, write_start):
        """x `[B, T, D]`; rope (cos, sin) `[B, T, Hd]`; query_scale `[B, T, 1, 1]` or None; mask `[B, 1, T, S]`.

        Without a cache S = T. With one, `cache` is (k, v) `[B, S, K, Hd]`; this call's keys and values are
        written at rows `write_start [B]` .. + T, and the updated cache is returned with the output.
        """
        b, t, _ = x.shape
        q = layers.apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), *rope)
        k = layers.apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if query_scale is not None:
            q = q * query_scale
        if cache is not None:
            write = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (s, 0, 0)))
            cache = (write(cache[0], k, write_start), write(cache[1], v, write_start))
            k, v = cache
        # Query head h uses KV head h // (H / K), as transformers' repeat_kv does.
        out = layers.attention(q, k, v, None, self.attention_impl, mask=mask)
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    """down_proj(SiLU(gate_proj(x)) * up_proj(x)), `[B, T, D] -> [B, T, D]`."""

    def __init__(self, config: MistralConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = layers.linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = layers.linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = layers.linear(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def _rms_norm(config: MistralConfig, dtype, param_dtype) -> layers.RMSNorm:
    # MistralRMSNorm: `weight * normed.to(input_dtype)` (rounded before the weight multiply).
    return layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, round_before_scale=True, axis_name="norm",
                          dtype=dtype, param_dtype=param_dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)); `[B, T, D] -> [B, T, D]`."""

    def __init__(self, config: MistralConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = _rms_norm(config, dtype, param_dtype)
        self.self_attn = Attention(config, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.post_attention_layernorm = _rms_norm(config, dtype, param_dtype)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope, query_scale, mask, cache, write_start):
        update, cache = self.self_attn(self.input_layernorm(x), rope, query_scale, mask, cache, write_start)
        x = x + update
        return x + self.mlp(self.post_attention_layernorm(x)), cache


KVCache = tuple[jax.Array, jax.Array]  # (keys, values), each [L, B, S, K, Hd]
# Logical axes of the residual stream at layer boundaries and of the KV cache (its length is never split:
# decoding writes at a traced position).
ACTIVATION_AXES = ("batch", "length", "act_embed")
KV_CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")


class MistralModel(nnx.Module):
    """The Mistral / Ministral-3 decoder: token embeddings, stacked layers, final norm, lm_head.

    `encoder_only=True` builds the text encoder: the first `num_hidden_layers - 1` layers only (no final
    norm, no head). `dtype` is the compute dtype, `param_dtype` the storage dtype. With tied embeddings
    the head is `embed_tokens` (no `lm_head` parameter). Plain calls of `encode`, `hidden_states`, `logits`
    and the forward compile once per input shape (`compiled.compiled_method`); inside a transformation they
    trace the math itself.
    """

    def __init__(self, config: MistralConfig, *, encoder_only: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str = "xla", remat: str = "none",
                 scan_layers: bool = True, rngs: nnx.Rngs):
        layers.check_build_settings(remat, attention_impl)
        self.config = config
        self.encoder_only = encoder_only
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        self.num_layers = config.num_encoder_layers if encoder_only else config.num_hidden_layers
        inv_freq, self.attention_factor = config.inverse_frequencies()
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static (hashable) and exact: fp32 values as floats
        # torch.nn.Embedding's default init is N(0, 1).
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=layers.logical(nnx.initializers.normal(1.0), ("vocab", "embed")),
                                      rngs=rngs)

        self.layers = layers.create_stacked(
            lambda layer_rngs: DecoderLayer(config, attention_impl=attention_impl, dtype=dtype,
                                            param_dtype=param_dtype, rngs=layer_rngs), self.num_layers, rngs)
        self.norm = None if encoder_only else _rms_norm(config, dtype, param_dtype)
        untied_head = not encoder_only and not config.tie_word_embeddings
        self.lm_head = layers.linear(config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs) if untied_head else None

    @compiled_method(static_argnames=("num_layers",))
    def hidden_states(self, input_ids, positions, kv_lengths, *, num_layers: int | None = None,
                      cache: KVCache | None = None, write_start=None) -> tuple[jax.Array, KVCache | None]:
        """Embeddings then the first `num_layers` layers (default all built): `[B, T]` ids -> `[B, T, D]`.

        `positions [B, T]` are the tokens' absolute positions (RoPE, causal mask); keys at positions
        >= `kv_lengths [B]` are masked. With `cache` (see `init_cache`), keys/values are written at
        `write_start [B]` and attention runs over the whole cache; the updated cache is returned.
        """
        cfg = self.config
        input_ids, positions = jnp.asarray(input_ids), jnp.asarray(positions, jnp.int32)
        num_layers = self.num_layers if num_layers is None else num_layers
        if not 0 < num_layers <= self.num_layers:
            raise ValueError(f"num_layers must be in 1..{self.num_layers}, got {num_layers}")
        x = self.embed_tokens(input_ids)
        rope = rope_cos_sin(positions, self.inv_freq, self.attention_factor, self.dtype)
        query_scale = None
        if cfg.llama_4_query_scaling:
            rp = cfg.rope_parameters
            query_scale = llama_4_query_scale(positions, rp.llama_4_scaling_beta,
                                              rp.original_max_position_embeddings, self.dtype)
        num_keys = x.shape[1] if cache is None else cache[0].shape[2]
        mask = attention_mask(positions, jnp.asarray(kv_lengths, jnp.int32), num_keys, cfg.sliding_window)
        return self._run_layers(x, num_layers, rope, query_scale, mask, cache, write_start)

    def _run_layers(self, x, num_layers, rope, query_scale, mask, cache, write_start):
        def step(layer, carry, layer_cache):
            carry, layer_cache = layer(carry, rope, query_scale, mask, layer_cache, write_start)
            if layer_cache is not None:
                layer_cache = tuple(layers.constrain(c, KV_CACHE_AXES[1:]) for c in layer_cache)
            return layers.constrain(carry, ACTIVATION_AXES), layer_cache

        return layers.run_stacked(self.layers, step, layers.constrain(x, ACTIVATION_AXES), cache, remat=self.remat,
                                  scan=self.scan_layers, num_layers=num_layers)

    @compiled_method
    def encode(self, input_ids, lengths) -> jax.Array:
        """Text-encoder features: `input_ids [B, T]` right-padded, `lengths [B]` -> `[B, T, D]` in the compute dtype.

        Equals transformers' `Mistral3Model(input_ids).hidden_states[-2]` of each prompt run alone on its
        valid positions: the residual stream after `num_hidden_layers - 1` layers, no final norm. Padded
        positions hold finite values that mean nothing.
        """
        input_ids = jnp.asarray(input_ids)
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        out, _ = self.hidden_states(input_ids, positions, lengths, num_layers=self.config.num_encoder_layers)
        return out

    @compiled_method
    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm then the head: `[..., D] -> [..., V]` in the compute dtype."""
        if self.encoder_only:
            raise ValueError("this model was built encoder_only (no final norm or head)")
        hidden = self.norm(hidden)
        return self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)

    @compiled_method
    def __call__(self, input_ids, lengths=None) -> jax.Array:
        """Causal-LM forward without a cache: `input_ids [B, T]` (right-padded to `lengths [B]`) -> logits
        `[B, T, V]` in the compute dtype."""
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
        hidden, _ = self.hidden_states(input_ids, jnp.broadcast_to(jnp.arange(t), (b, t)), lengths)
        return self.logits(hidden)

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache `(k, v)`, each `[L, B, max_length, K, Hd]` in the compute dtype."""
        cfg = self.config
        shape = (self.num_layers, batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
        return tuple(layers.constrain(jnp.zeros(shape, self.dtype), KV_CACHE_AXES) for _ in range(2))


def init_model(config: MistralConfig, *, seed: int = 0, **kwargs) -> MistralModel:
    """A randomly initialised decoder (torch-like init, norms at 1)."""
    return MistralModel(config, rngs=nnx.Rngs(seed), **kwargs)


def abstract_model(config: MistralConfig, **kwargs) -> MistralModel:
    """The decoder with `jax.ShapeDtypeStruct` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: MistralModel(config, rngs=nnx.Rngs(0), **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# Sampling and generation (the PE).


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """transformers' warpers in generate's order, `[B, V]` fp32 -> `[B, V]` with removed tokens at -inf.

    TemperatureLogitsWarper (logits / temperature), TopKLogitsWarper (keep every token >= the k-th largest,
    so ties at the boundary survive; `top_k <= 0` disables it, as generate does for 0), TopPLogitsWarper
    (sort ascending, remove tokens whose cumulative probability is <= 1 - top_p, always keep the largest;
    `top_p >= 1` disables it). All three may be traced values.
    """
    vocab = logits.shape[-1]
    scores = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where(k <= 0, vocab, jnp.clip(k, 1, vocab))
    # A stable ascending argsort, as torch.sort(descending=False) orders ties (by index).
    order = jnp.argsort(scores, axis=-1, stable=True)
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    kth_largest = jnp.take_along_axis(sorted_scores, jnp.broadcast_to(vocab - k, scores.shape[:-1])[..., None],
                                      axis=-1)
    scores = jnp.where(scores < kth_largest, -jnp.inf, scores)
    sorted_scores = jnp.where(sorted_scores < kth_largest, -jnp.inf, sorted_scores)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    top_p = jnp.asarray(top_p, jnp.float32)
    sorted_remove = (cumulative <= 1 - top_p) & (top_p < 1)
    sorted_remove = sorted_remove.at[..., -1].set(False)  # min_tokens_to_keep = 1
    remove = jnp.zeros_like(sorted_remove)
    remove = jnp.put_along_axis(remove, order, sorted_remove, axis=-1, inplace=False)
    return jnp.where(remove, -jnp.inf, scores)


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One token per row, `[B, V]` -> `[B]` int32: greedy argmax when `temperature == 0`, otherwise a
    categorical draw from `filter_logits` (same distribution as transformers' multinomial draw)."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    return jax.lax.cond(
        temperature > 0,
        lambda: jax.random.categorical(key, filter_logits(logits, jnp.where(temperature > 0, temperature, 1),
                                                          top_k, top_p), axis=-1).astype(jnp.int32),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _generate_loop(graphdef, params, prompt_ids, lengths, key, temperature, top_k, top_p, eos_ids, pad_id, *,
                   max_new_tokens: int):
    """Prefill the right-padded prompts, then decode until every row hit eos or max_new_tokens.

    Returns (tokens `[B, max_new_tokens]` padded with pad_id, number of steps taken).
    """
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    hidden, cache = model.hidden_states(prompt_ids, positions, lengths, cache=cache,
                                        write_start=jnp.zeros((batch,), jnp.int32))
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    # generate takes the last position's logits in fp32 before any processing.
    logits = model.logits(last).astype(jnp.float32)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def keep_going(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(state):
        step, logits, cache, position, done, tokens = state
        token = sample_logits(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
        # Finished rows emit pad (transformers: next * unfinished + pad * (1 - unfinished)).
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        done = done | jnp.isin(token, eos_ids)
        # The next token's logits (after the last step this one-token forward goes unused).
        hidden, cache = model.hidden_states(token[:, None], position[:, None], position + 1, cache=cache,
                                            write_start=position)
        return step + 1, model.logits(hidden[:, 0]).astype(jnp.float32), cache, position + 1, done, tokens

    state = (jnp.int32(0), logits, cache, lengths, done, tokens)
    step, _, _, _, _, tokens = jax.lax.while_loop(keep_going, step_fn, state)
    return tokens, step


_generate_jit = jax.jit(_generate_loop, static_argnums=(0,), static_argnames=("max_new_tokens",))


def generate(model: MistralModel, prompt_ids, lengths=None, *, max_new_tokens: int, eos_token_id=None,
             pad_token_id=None, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
             do_sample: bool = True, seed: int = 0, bucket: int = 64, loop=None) -> np.ndarray:
    """transformers-equivalent `generate` for the causal LM: returns the new token ids `[B, N]` (numpy int32).

    `prompt_ids [B, T]` right-padded to `lengths [B]` (default: all T). Each row stops at its first eos
    (included, as transformers does) and is padded with `pad_token_id` after it; N is the number of steps
    until every row stopped, at most `max_new_tokens`. `eos_token_id` / `pad_token_id` default to the
    config's (pad falls back to eos, as in transformers). Sampling is temperature -> top-k -> top-p ->
    categorical with `jax.random.key(seed)`; `do_sample=False` or `temperature == 0` is greedy argmax.
    Transformers' own default top_k is 50. Prompts are padded to a multiple of `bucket`, so the loop
    compiles once per (batch, bucket, max_new_tokens, model). `loop` replaces the single-device compiled loop
    by another compilation of `_generate_loop` with the same signature (e.g. a sharded one).
    """
    cfg = model.config
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [B, T] with T >= 1, got shape {prompt_ids.shape}")
    batch, length = prompt_ids.shape
    lengths = np.full((batch,), length, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > length:
        raise ValueError(f"lengths must be [{batch}] in 1..{length}, got {lengths}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if model.encoder_only:
        raise ValueError("generate needs the full causal LM, not an encoder_only model")
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = np.asarray([] if eos is None else np.atleast_1d(eos), np.int32)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    pad = pad if pad is not None else (int(eos_ids[0]) if eos_ids.size else 0)
    if not do_sample:
        temperature = 0.0
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    padded = -(-length // bucket) * bucket
    ids = np.zeros((batch, padded), np.int32)
    ids[:, :length] = prompt_ids
    graphdef, params = nnx.split(model)
    tokens, steps = (loop or _generate_jit)(graphdef, params, ids, lengths, jax.random.key(seed),
                                            np.float32(temperature), np.int32(top_k), np.float32(top_p), eos_ids,
                                            np.int32(pad), max_new_tokens=max_new_tokens)
    return np.asarray(tokens)[:, :int(steps)]
