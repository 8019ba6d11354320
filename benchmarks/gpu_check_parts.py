"""The measuring process of benchmarks/gpu_check.py: runs the parts it is given, appending each result row
to a JSON-lines file (`--records`) as soon as it is measured. Not meant to be called by hand; see
gpu_check.py for what each part measures and benchmarks/README.md for how the numbers are defined.

Records: `{"env": {...}}` once, `{"start": part}` / `{"end": part, "status", "seconds"}` around each part,
and rows `{"part", "name", "framework", ...}` with any of: seconds (median per call, per image or per
step), flops (per timed unit), peak (a matmul-peak row), peak_memory_bytes, max_rel_error,
mean_rel_error, compile_seconds, first_call_seconds, error, and notes.

Peak memory: jax's is the device's `peak_bytes_in_use`, which never resets, so within a part each jax
row shows the peak so far (the smaller case runs first); torch's is `torch.cuda.max_memory_allocated`,
reset before each torch case. Both are None on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

# jax's backend loads its CUDA libraries before torch's import loads torch's: jax refuses a cuDNN older than
# the one it was built with if it finds one already loaded.
DEVICE = jax.devices()[0]

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import (alternating_times, forward_flops, jax_matmul_seconds, median_seconds,  # noqa: E402
                               torch_matmul_seconds)
from benchmarks.gpu_check import PARTS, Settings, budget_refusal, log  # noqa: E402
from conversions.key_table import to_state_dict  # noqa: E402
from conversions.transformer import diffusers_config, key_table  # noqa: E402
from ernie_jax import parallel, sampling  # noqa: E402
from ernie_jax.models import layers  # noqa: E402
from ernie_jax.models.dit import PRESETS, ErnieImageTransformer, abstract_transformer, init_transformer  # noqa: E402
from ernie_jax.training.objectives import flow_matching  # noqa: E402
from ernie_jax.training import optimizer as optimizers  # noqa: E402
from ernie_jax.training import step as train_step  # noqa: E402
from ernie_jax.training.state import (  # noqa: E402
    TrainablePart,
    abstract_train_state,
    create_train_state,
    shardings_of,
)

TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if TORCH_DEVICE == "cpu":
    # On a CPU this runs the plumbing at test size, not a speed comparison; one thread keeps torch from
    # spinning against jax's threads on a small shared machine.
    torch.set_num_threads(1)
EMA_DECAY = 0.9999
SHIFT = 4.0  # the released scheduler's shift, for both loops
CFG_GUIDANCE = 4.0
# Device bytes per block parameter of the training step: fp32 master weight, two Adam moments, EMA and
# gradient (4 bytes each), and the bf16 compute copy.
TRAIN_BYTES_PER_PARAMETER = 22


class Recorder:
    """Appends records to the parent's JSON-lines file, one flushed line each, so a kill loses nothing
    already measured."""

    def __init__(self, path: Path):
        self.path = path
        self.part = None
        self.errors = 0
        self.last_error = ""

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def row(self, name: str, framework: str | None = None, **fields) -> None:
        self.write({"part": self.part, "name": name, "framework": framework, **fields})
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        log(f"{self.part}: {name}: {shown}")

    def measure(self, name: str, framework: str | None, measurement) -> dict | None:
        """Records `measurement()`'s fields as a row, or an error row if it raises; returns the fields."""
        try:
            fields = measurement()
        except Exception as error:  # noqa: BLE001 - any failure becomes an error row and the run goes on
            self.failed(name, framework, error)
            return None
        self.row(name, framework, **fields)
        return fields

    def failed(self, name: str, framework: str | None, error: Exception) -> None:
        traceback.print_exc()
        self.errors += 1
        self.last_error = describe(error)
        self.row(name, framework, error=self.last_error)

    def measure_attention(self, name: str, attention: dict, measurement) -> dict | None:
        """`measure` of `measurement(implementation, note)` with `attention`'s implementation and note; when
        cudnn fails for a reason other than memory, that error row stays and xla is measured, and
        `attention` switches to xla for what follows."""
        fields = self.measure(f"{name}, {attention['implementation']} attention", "jax",
                              lambda: measurement(attention["implementation"], attention["note"]))
        out_of_memory = any(sign in self.last_error for sign in ("RESOURCE_EXHAUSTED", "MemoryError", "out of memory"))
        if fields is None and attention["implementation"] == "cudnn" and not out_of_memory:
            attention.update(implementation="xla", note="cudnn attention failed here, see the row above")
            fields = self.measure(f"{name}, xla attention", "jax",
                                  lambda: measurement(attention["implementation"], attention["note"]))
        return fields


def describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}"


# ------------------------------------------------------------------------------------------ measuring aids

def jax_peak_bytes() -> int | None:
    stats = DEVICE.memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def reset_torch_peak() -> None:
    if TORCH_DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def torch_peak_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if TORCH_DEVICE == "cuda" else None


def torch_sync() -> None:
    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def once_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def relative_errors(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """max |a - e| / max |e| and mean |a - e| / mean |e|, in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    difference = np.abs(actual - expected)
    return {"max_rel_error": float(difference.max() / np.abs(expected).max()),
            "mean_rel_error": float(difference.mean() / np.abs(expected).mean())}


def rounded(array: np.ndarray, dtype) -> np.ndarray:
    """`array` (float32) with its values rounded to `dtype`, so that both sides get identical inputs."""
    return np.array(jnp.asarray(array, dtype).astype(jnp.float32))


def text_features(rng, config, lengths: list[int], padded: int) -> np.ndarray:
    """Random text-encoder features `[B, padded, D_text]`, zero beyond each row's length (as the pipelines
    pad them)."""
    text = rng.standard_normal((len(lengths), padded, config.text_in_dim), np.float32)
    return text * (np.arange(padded)[None, :] < np.array(lengths)[:, None])[..., None]


def usable_attention(requested: str, heads: int, head_dim: int, batch: int, tokens: int, dtype,
                     with_grad: bool) -> dict:
    """{"implementation": `requested`, "note": None}, or xla and why when cudnn attention fails at these
    shapes (e.g. on a CPU)."""
    if requested != "cudnn":
        return {"implementation": requested, "note": None}
    query = jnp.zeros((batch, tokens, heads, head_dim), dtype)
    lengths = jnp.full((batch,), tokens, jnp.int32)
    attend = lambda q: layers.attention(q, q, q, lengths, "cudnn").astype(jnp.float32).sum()
    try:
        jax.block_until_ready(jax.jit(jax.grad(attend) if with_grad else attend)(query))
    except Exception as error:  # noqa: BLE001
        return {"implementation": "xla", "note": f"cudnn attention unavailable, used xla ({describe(error)[:160]})"}
    return {"implementation": "cudnn", "note": None}


@functools.partial(jax.jit, static_argnums=(0, 1))
def random_state(config, dtype) -> nnx.State:
    """`init_transformer`'s weights (torch-like uniform init, seed 0) in `dtype`, made by one compiled program:
    eagerly, each random draw would leave full-size temporaries behind in jax's peak-memory counter, which
    the parts report."""
    return nnx.state(init_transformer(config, seed=0, dtype=dtype, param_dtype=dtype))


def build_model(config, dtype) -> ErnieImageTransformer:
    """The DiT with `random_state`'s weights on jax's default device."""
    start = time.perf_counter()
    state = jax.block_until_ready(random_state(config, jnp.dtype(dtype)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    stats = DEVICE.memory_stats()
    log(f"built the DiT: {count / 1e9:.3f}B parameters in {jnp.dtype(dtype).name} in "
        f"{time.perf_counter() - start:.1f} s" + (f"; jax's peak so far {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
                                                  if stats else ""))
    return nnx.merge(nnx.graphdef(abstract_transformer(config, dtype=dtype, param_dtype=dtype)), state)


def with_attention(model: ErnieImageTransformer, implementation: str) -> ErnieImageTransformer:
    """The same parameters (not copied) under a graph whose attention runs `implementation`."""
    graphdef = nnx.graphdef(abstract_transformer(model.config, dtype=model.dtype, param_dtype=model.dtype,
                                                 attention_impl=implementation))
    return nnx.merge(graphdef, nnx.state(model))


def jax_to_torch(array: jax.Array) -> torch.Tensor:
    """A copy of `array` in torch's allocator on torch's device: device to device through DLPack, or
    through host memory where DLPack refuses the pair."""
    try:
        return torch.from_dlpack(array).to(TORCH_DEVICE, copy=True)
    except (BufferError, RuntimeError, TypeError):
        host = np.asarray(array)
        if host.dtype == jnp.bfloat16:  # numpy's bfloat16 (ml_dtypes) is unknown to torch: move the bits
            return torch.from_numpy(host.view(np.uint16).copy()).view(torch.bfloat16).to(TORCH_DEVICE)
        return torch.from_numpy(host.copy()).to(TORCH_DEVICE)


def torch_state_dict(model: ErnieImageTransformer) -> dict[str, torch.Tensor]:
    """diffusers' state dict of `model` on torch's device without a host round trip: the key table's
    transposes run on jax's device, one tensor at a time, and each crosses by `jax_to_torch` (copied, so
    torch's memory counters see it and jax frees its buffer). On a CPU this is the host path."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return to_state_dict(key_table(model.config), params, model.config.num_layers,
                         convert=jax_to_torch)


def torch_reference(model: ErnieImageTransformer):
    """diffusers' `ErnieImageTransformer2DModel` holding `model`'s weights (built on the meta device, so no
    weights are initialised only to be overwritten)."""
    from diffusers import ErnieImageTransformer2DModel

    start = time.perf_counter()
    with torch.device("meta"):
        reference = ErnieImageTransformer2DModel.from_config(diffusers_config(model.config))
    reference.load_state_dict(torch_state_dict(model), strict=True, assign=True)
    torch_sync()
    log(f"diffusers' transformer holds the same weights ({time.perf_counter() - start:.1f} s)")
    return reference.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------- parts

def part_matmul(settings: Settings, recorder: Recorder) -> None:
    n = settings.matmul_size
    flops = 2.0 * n**3
    repeats = 4 * settings.repeats
    recorder.measure(f"bf16 matmul {n}^3 (x @ x, jitted)", "jax",
                     lambda: {"seconds": jax_matmul_seconds(n, "bfloat16", repeats), "flops": flops, "peak": True})
    recorder.measure(f"bf16 matmul {n}^3 (torch.mm)", "torch",
                     lambda: {"seconds": torch_matmul_seconds(n, "bfloat16", repeats), "flops": flops, "peak": True})


def part_forward(settings: Settings, recorder: Recorder) -> None:
    """One CFG forward (unconditional row first, as the pipelines batch it): ours with cudnn, then xla
    attention, then diffusers; each of ours against diffusers' output."""
    config, dtype = PRESETS[settings.preset], jnp.dtype(settings.dtype)
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, config.in_channels, settings.latent, settings.latent), np.float32)
    inputs = {"latents": rounded(np.repeat(latent, settings.batch, axis=0), dtype),
              "timestep": np.full((settings.batch,), 500.0, np.float32),
              "text": rounded(text_features(rng, config, [settings.uncond_text_len, settings.text_len],
                                            settings.text_len), dtype),
              "text_lens": np.array([settings.uncond_text_len, settings.text_len], np.int32)}
    flops = forward_flops(config, settings.batch, settings.image_tokens, settings.text_len)
    model = build_model(config, dtype)
    outputs = {}

    def ours(implementation: str) -> dict:
        graphdef, state = nnx.split(with_attention(model, implementation))
        arguments = [jnp.asarray(inputs["latents"], dtype), jnp.asarray(inputs["timestep"]),
                     jnp.asarray(inputs["text"], dtype), jnp.asarray(inputs["text_lens"])]
        start = time.perf_counter()
        compiled = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *arguments).compile()
        compile_seconds = time.perf_counter() - start
        seconds = median_seconds(lambda: compiled(state, *arguments).block_until_ready(), settings.repeats)
        outputs[implementation] = np.asarray(compiled(state, *arguments).astype(jnp.float32))
        return {"seconds": seconds, "flops": flops, "compile_seconds": compile_seconds,
                "peak_memory_bytes": jax_peak_bytes()}

    for implementation in ("cudnn", "xla"):  # jax's peak only grows: the smaller case first
        recorder.measure(f"ours, {implementation} attention", "jax", lambda i=implementation: ours(i))

    def diffusers_forward() -> dict:
        reference = torch_reference(model)
        arguments = [torch.from_numpy(inputs["latents"]).to(TORCH_DEVICE, getattr(torch, settings.dtype)),
                     torch.from_numpy(inputs["timestep"]).to(TORCH_DEVICE, getattr(torch, settings.dtype)),
                     torch.from_numpy(inputs["text"]).to(TORCH_DEVICE, getattr(torch, settings.dtype)),
                     torch.from_numpy(inputs["text_lens"]).to(TORCH_DEVICE, torch.int64)]
        with torch.inference_mode():
            reset_torch_peak()
            seconds = median_seconds(lambda: (reference(*arguments, return_dict=False), torch_sync()),
                                     settings.repeats)
            outputs["diffusers"] = reference(*arguments, return_dict=False)[0].float().cpu().numpy()
        return {"seconds": seconds, "flops": flops, "peak_memory_bytes": torch_peak_bytes()}

    recorder.measure("diffusers (torch SDPA)", "torch", diffusers_forward)
    for implementation in ("cudnn", "xla"):
        if implementation in outputs and "diffusers" in outputs:
            recorder.row(f"ours ({implementation}) vs diffusers, velocity",
                         **relative_errors(outputs[implementation], outputs["diffusers"]))


def part_sampling(settings: Settings, recorder: Recorder) -> None:
    """Seconds per image of the Turbo and the CFG loop, ours and diffusers', from the same latents and text
    features; then how far apart their final latents are."""
    config, dtype = PRESETS[settings.preset], jnp.dtype(settings.dtype)
    rng = np.random.default_rng(1)
    latents = rounded(rng.standard_normal((1, config.in_channels, settings.latent, settings.latent), np.float32),
                      dtype)
    positive = rounded(text_features(rng, config, [settings.text_len], settings.text_len), dtype)
    negative = rounded(text_features(rng, config, [settings.uncond_text_len], settings.uncond_text_len), dtype)
    tokens = settings.image_tokens + settings.text_len
    attention = usable_attention(settings.attention, config.num_attention_heads, config.head_dim, 2, tokens, dtype,
                                 with_grad=False)
    model = build_model(config, dtype)
    loops = [(f"{settings.turbo_steps}-step Turbo loop (guidance 1), per image", settings.turbo_steps, 1.0),
             (f"{settings.cfg_steps}-step CFG loop (guidance {CFG_GUIDANCE:g}), per image", settings.cfg_steps,
              CFG_GUIDANCE)]
    finals = {}

    def flops_of(steps: int, guidance: float) -> float:
        return steps * forward_flops(config, 2 if guidance > 1 else 1, settings.image_tokens, settings.text_len)

    def ours(label: str, steps: int, guidance: float, implementation: str, note: str | None) -> dict:
        negatives = dict(negative_text_bth=negative, negative_text_lens=np.array([settings.uncond_text_len]))
        loop_model = with_attention(model, implementation)

        def run():
            finals["ours", label] = sampling.sample(
                loop_model, latents, positive, np.array([settings.text_len]), num_inference_steps=steps,
                guidance_scale=guidance, shift=SHIFT, **(negatives if guidance > 1 else {})).block_until_ready()

        first = once_seconds(run)
        seconds = alternating_times([run], 1, 1, warmup=0)[0][0]
        return {"seconds": seconds, "flops": flops_of(steps, guidance), "first_call_seconds": first,
                "peak_memory_bytes": jax_peak_bytes(), "note": note}

    for label, steps, guidance in loops:  # Turbo (batch 1) first: jax's peak only grows
        recorder.measure_attention(f"ours, {label}", attention, lambda *a, l=(label, steps, guidance): ours(*l, *a))

    pipeline = {}

    def diffusers(label: str, steps: int, guidance: float, warmup: int) -> dict:
        if "pipe" not in pipeline:
            from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

            pipeline["pipe"] = ErnieImagePipeline(
                transformer=torch_reference(model), vae=None, text_encoder=None, tokenizer=None,
                scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT))
            pipeline["pipe"].set_progress_bar_config(disable=True)
        to_torch = lambda x: torch.from_numpy(x).to(TORCH_DEVICE, getattr(torch, settings.dtype))

        def run():
            finals["diffusers", label] = pipeline["pipe"](
                prompt_embeds=[to_torch(positive[0])],
                negative_prompt_embeds=[to_torch(negative[0])] if guidance > 1 else None,
                latents=to_torch(latents), height=16 * settings.latent, width=16 * settings.latent,
                num_inference_steps=steps, guidance_scale=guidance, output_type="latent", use_pe=False).images
            torch_sync()

        reset_torch_peak()
        seconds = alternating_times([run], 1, 1, warmup=warmup)[0][0]
        return {"seconds": seconds, "flops": flops_of(steps, guidance), "peak_memory_bytes": torch_peak_bytes()}

    for index, (label, steps, guidance) in enumerate(loops):
        recorder.measure(f"diffusers, {label}", "torch",
                         lambda a=(label, steps, guidance, int(index == 0)): diffusers(*a))
    for label, _, _ in loops:
        if ("ours", label) in finals and ("diffusers", label) in finals:
            recorder.row(f"ours vs diffusers, final latents of the {label.split(',')[0]}",
                         **relative_errors(np.asarray(finals["ours", label].astype(jnp.float32)),
                                           finals["diffusers", label].float().cpu().numpy()))


def part_train(settings: Settings, recorder: Recorder) -> None:
    """The trainer's step on a DiT of the preset's width and `train_layers` blocks; if the compiled step
    needs more than this device holds, fewer blocks (one recompilation)."""
    config = dataclasses.replace(PRESETS[settings.preset], num_layers=settings.train_layers)
    compute_dtype = jnp.dtype(settings.dtype)
    attention = usable_attention(settings.attention, config.num_attention_heads, config.head_dim,
                                 settings.train_batch, settings.image_tokens + settings.text_len, compute_dtype,
                                 with_grad=True)
    rng = np.random.default_rng(2)
    batch = {"latents": jnp.asarray(rng.standard_normal(
                 (settings.train_batch, config.in_channels, settings.latent, settings.latent), np.float32)),
             "text": jnp.asarray(text_features(rng, config, [settings.text_len] * settings.train_batch,
                                               settings.text_len)),
             "text_lens": jnp.full((settings.train_batch,), settings.text_len, jnp.int32)}
    mesh = parallel.make_mesh({})
    rules = parallel.TRAINING_RULES
    optimizer_config = optimizers.OptimizerConfig(weight_decay=0.01)
    optimizer = optimizers.make_optimizer(optimizer_config)

    def compile_step(num_layers: int, implementation: str):
        layer_config = dataclasses.replace(config, num_layers=num_layers)
        model_fn = lambda rngs: ErnieImageTransformer(layer_config, dtype=compute_dtype, param_dtype=jnp.float32,
                                                      attention_impl=implementation, remat=settings.train_remat,
                                                      rngs=rngs)
        parts = {"transformer": TrainablePart(model_fn, optimizer, ema_decay=EMA_DECAY,
                                              learning_rate=optimizers.learning_rate_schedule(optimizer_config))}
        graphdefs, abstract = abstract_train_state(parts, seed=0, mesh=mesh, rules=rules)
        step = train_step.make_train_step(parts, graphdefs, flow_matching.FlowMatching())
        jitted = train_step.jit_train_step(step, mesh, rules, shardings_of(abstract), {},
                                           train_step.batch_shardings(mesh, rules, batch))
        start = time.perf_counter()
        compiled = jitted.lower(abstract, {}, batch).compile()
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        needed = None if memory is None else (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                              - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
        log(f"compiled the training step with {num_layers} blocks in {seconds:.1f} s; it needs "
            + ("an unknown amount of memory" if needed is None else f"{needed / 2**30:.2f} GiB"))
        return parts, compiled, seconds, needed

    def measure(implementation: str, fallback: str | None) -> dict:
        num_layers = settings.train_layers
        parts, compiled, compile_seconds, needed = compile_step(num_layers, implementation)
        limit = (DEVICE.memory_stats() or {}).get("bytes_limit")
        note = fallback
        if limit and needed and needed > 0.95 * limit:
            per_layer = TRAIN_BYTES_PER_PARAMETER * (4 * config.hidden_size**2
                                                     + 3 * config.hidden_size * config.ffn_hidden_size)
            fewer = num_layers - math.ceil((needed - 0.9 * limit) / per_layer)
            if fewer < 1:
                raise MemoryError(f"the step with {num_layers} blocks needs {needed / 2**30:.1f} GiB of "
                                  f"{limit / 2**30:.1f} GiB: not even one block would fit")
            note = "; ".join(filter(None, [fallback, f"{num_layers} blocks need {needed / 2**30:.1f} GiB of "
                                                     f"{limit / 2**30:.1f} GiB: ran {fewer}"]))
            num_layers = fewer
            parts, compiled, compile_seconds, needed = compile_step(num_layers, implementation)
        _, state = create_train_state(parts, seed=0, mesh=mesh, rules=rules)
        current = {"state": state}

        def step():
            current["state"], current["metrics"] = compiled(current["state"], {}, batch)
            jax.block_until_ready(current["state"])

        seconds = median_seconds(step, settings.train_steps)
        loss = float(current["metrics"]["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss}")
        forward = forward_flops(dataclasses.replace(config, num_layers=num_layers), settings.train_batch,
                                settings.image_tokens, settings.text_len)
        # Model FLOPs: forward + backward (two matmuls per forward one); full remat adds one more forward.
        return {"seconds": seconds, "flops": 3 * forward, "flops_with_recompute": 4 * forward,
                "layers": num_layers, "batch": settings.train_batch, "compile_seconds": compile_seconds,
                "memory_needed_bytes": needed, "peak_memory_bytes": jax_peak_bytes(), "loss": loss, "note": note}

    recorder.measure_attention(f"training step, hidden {config.hidden_size}, batch {settings.train_batch}, "
                               f"remat {settings.train_remat}, AdamW + EMA", attention, measure)


def part_flops(settings: Settings, recorder: Recorder) -> None:
    """`forward_flops` against XLA's cost analysis of the compiled forward: 2 blocks, unrolled (the cost
    analysis counts a scanned body once), the forward part's batch and tokens, nothing allocated."""
    config = dataclasses.replace(PRESETS[settings.preset], num_layers=2)
    dtype = jnp.dtype(settings.dtype)
    graphdef, state = nnx.split(abstract_transformer(config, dtype=dtype, param_dtype=dtype, scan_layers=False))
    batch, side = settings.batch, settings.latent
    arguments = (jax.ShapeDtypeStruct((batch, config.in_channels, side, side), dtype),
                 jax.ShapeDtypeStruct((batch,), jnp.float32),
                 jax.ShapeDtypeStruct((batch, settings.text_len, config.text_in_dim), dtype),
                 jax.ShapeDtypeStruct((batch,), jnp.int32))

    def measure() -> dict:
        compiled = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *arguments).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        counted = forward_flops(config, batch, settings.image_tokens, settings.text_len)
        return {"flops": counted, "xla_flops": float(analysis["flops"]),
                "xla_over_formula": float(analysis["flops"]) / counted, "note": f"on {DEVICE.platform}"}

    recorder.measure(f"forward FLOPs of 2 blocks, batch {batch}, {settings.image_tokens} + {settings.text_len} "
                     f"tokens: formula vs XLA cost analysis", None, measure)


PART_FUNCTIONS = {"matmul": part_matmul, "forward": part_forward, "train": part_train, "sampling": part_sampling,
                  "flops": part_flops}
assert set(PART_FUNCTIONS) == set(PARTS)


def environment() -> dict:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    try:
        torch_device_name = torch.cuda.get_device_name() if TORCH_DEVICE == "cuda" else platform.processor()
    except RuntimeError as error:  # a broken CUDA setup on torch's side fails the torch rows, not the run
        torch_device_name = describe(error)
    stats = DEVICE.memory_stats() or {}
    return {"device_kind": DEVICE.device_kind, "platform": DEVICE.platform, "jax": jax.__version__,
            "flax": version("flax"), "torch": torch.__version__, "torch_device": TORCH_DEVICE,
            "torch_device_name": torch_device_name, "diffusers": version("diffusers"),
            "python": platform.python_version(), "device_memory_bytes": stats.get("bytes_limit")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", required=True)
    parser.add_argument("--settings", required=True, help="gpu_check.Settings as JSON")
    parser.add_argument("--records", required=True, type=Path)
    parser.add_argument("--deadline", required=True, type=float, help="time.time() by which the run must end")
    args = parser.parse_args()
    settings = Settings(**json.loads(args.settings))
    recorder = Recorder(args.records)
    recorder.write({"env": environment()})
    for part in args.parts.split(","):
        recorder.part, recorder.errors = part, 0
        recorder.write({"start": part})
        start = time.perf_counter()
        refusal = budget_refusal(part, settings, args.deadline)
        if not settings.tiny and part != "flops" and DEVICE.platform == "cpu":
            # The real sizes on a CPU would only burn the budget (jax's GPU backend failed to load?).
            refusal = f"jax runs on the CPU ({DEVICE.device_kind}), not a GPU: the real sizes are not measured there"
        if refusal:
            recorder.row("(part skipped)", error=refusal)
            status = "skipped"
        else:
            log(f"{part}: start")
            try:
                PART_FUNCTIONS[part](settings, recorder)
            except Exception as error:  # noqa: BLE001 - e.g. building the model ran out of memory
                recorder.failed("(part failed)", None, error)
            status = "ok" if not recorder.errors else f"{recorder.errors} error rows"
        recorder.write({"end": part, "status": status, "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
