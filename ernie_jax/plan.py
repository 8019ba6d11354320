"""`python -m ernie_jax.plan --component dit --mode sample --resolution 1024 --batch 8 --mesh fsdp=8
--device-memory 95GiB`: will it fit? Per-device memory of the real-size model on a device mesh.

Compiles ahead of time, on emulated CPU devices and with abstract inputs (nothing is allocated), one
CFG denoising step (`--mode sample`: bf16 weights and activations) or the trainer's own update (`--mode
train`: `training.step`'s flow-matching loss over `--microbatches` scanned microbatches, gradient
clipping, AdamW and the EMA, on the train state of fp32 master weights, Adam moments and EMA weights,
bf16 compute, the chosen remat policy), then prints per-device bytes for parameters, optimizer state,
EMA weights, inputs and XLA's temporaries (activations and workspace, from the compiled
`memory_analysis`) and whether their sum fits `--device-memory`.
Post-training (`--mode train`): `--objective dpo` plans the DPO objective's step on `--batch` preference
pairs (each pair's chosen and rejected latents through the policy and a frozen reference of the same DiT,
held in `--frozen-dtype`); `--lora-rank R` trains rank-R adapters (float32, with their Adam moments and
EMA) on `--lora-targets` of a base held frozen in `--frozen-dtype`, and with `--objective dpo` the reference
is that base with the adapters off, the same arrays (as the runner passes them: counted once).
`--objective dmd` plans one DMD / MT-DMD step (training/objectives/dmd.py): 5 critic updates then one
generator update, each on a sixth of `--batch` (images), for a student and a critic (the whole DiT in fp32
with Adam and EMA each, or with `--lora-rank` adapters on one shared frozen base), `--teachers K` frozen
teachers in `--frozen-dtype` (with LoRA the first is the base with the adapters off: the same arrays), the
8-step student's backward simulation and the teachers' CFG, and with `--gan` the GAN head on the critic's
features. Frozen weights are reported on their own line, "frozen models".
`--with-text-encoder` (sampling) also compiles the real-size text encoder's encoding of the prompts and
negative prompts: the pipeline keeps both models on the devices, so the plan is the larger of the two
programs' peaks, each with the other model's weights added. Weights follow the inference rules for
sampling and the training rules for training (one table: split over fsdp and tensor).
The numbers come from XLA's CPU buffer assignment: accelerator compilers schedule and fuse
differently, so read them as estimates (within tens of percent), not guarantees.

Two CPU-only effects are taken out. XLA's CPU backend has no bf16 matmul: it upcasts bf16 dots to fp32
and then hoists the fp32 copy of every stacked weight (and of bf16 residual stacks) out of the layer
loop, which accelerators do not do; the plan compiles without the CPU's while-loop invariant code motion
pass. And the CPU backend ignores memory kinds, so tensors that a remat policy offloads to pinned host
memory stay in its temporaries; the plan reports their bytes on a line of their own ("offloaded to
host", from their per-device shapes) and leaves them out of the device total.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

COMPONENTS = ("dit",)
MODES = ("sample", "train")
OBJECTIVES = ("flow_matching", "dpo", "dmd")
DMD_CRITIC_UPDATES, DMD_STUDENT_STEPS, DMD_GAN_HIDDEN = 5, 8, 256  # dmd.Config's defaults
UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_bytes(text: str) -> int:
    """'95GiB' / '16GB' / '1024' -> bytes."""
    upper = text.strip().upper()
    for unit, factor in sorted(UNITS.items(), key=lambda u: -len(u[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m ernie_jax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--component", choices=COMPONENTS, default="dit")
    parser.add_argument("--mode", choices=MODES, default="sample")
    parser.add_argument("--resolution", type=int, default=1024, help="square image side in pixels")
    parser.add_argument("--batch", type=int, default=1, help="global batch (images; CFG doubles it when sampling)")
    parser.add_argument("--microbatches", type=int, default=1,
                        help="--mode train: the update's batch is scanned in this many microbatches")
    parser.add_argument("--text-len", type=int, default=256, help="padded text tokens per sample")
    parser.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=8 or data=2,fsdp=4,tensor=2")
    parser.add_argument("--with-text-encoder", action="store_true",
                        help="--mode sample: the pipeline's DiT and text encoder together on the mesh: also compiles "
                             "the encoding of the prompts and negative prompts, and the total is the larger of the two "
                             "programs' peaks, each with the other model's weights resident")
    parser.add_argument("--remat", default="full", help="remat policy for --mode train")
    parser.add_argument("--objective", choices=OBJECTIVES, default="flow_matching",
                        help="--mode train: the trainer's objective; dpo reads a frozen reference DiT and --batch "
                             "counts preference pairs (two images each)")
    parser.add_argument("--teachers", type=int, default=1,
                        help="--objective dmd: the number of frozen teachers in the committee (1: DMD2)")
    parser.add_argument("--gan", action="store_true",
                        help="--objective dmd: with the GAN head on the critic's features (a third trained part)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="--mode train: > 0 trains LoRA adapters of this rank on a frozen base instead of the "
                             "whole DiT")
    parser.add_argument("--lora-targets", default=None,
                        help="--lora-rank: comma-separated diffusers module names the adapters target (PEFT's "
                             "matching; default: every block's attention and MLP projections)")
    parser.add_argument("--frozen-dtype", default="bfloat16",
                        help="--mode train: the dtype of frozen weights (the LoRA base, the DPO reference, the DMD "
                             "teachers)")
    parser.add_argument("--without-ema", default="",
                        help="--mode train: comma-separated trained parts (transformer, critic, discriminator) that "
                             "keep no EMA (ema_decay 0 in their config)")
    parser.add_argument("--preset", default="full", help="transformer preset: full (the released 8B), small, tiny")
    parser.add_argument("--num-layers", type=int, help="override the preset's number of blocks (quick what-ifs)")
    parser.add_argument("--attention", default="xla",
                        help="attention implementation: xla materializes the [B, H, S, S] scores; splash (the TPU "
                             "flash kernel, interpreted on CPU) does not")
    parser.add_argument("--device-memory", default="80GiB")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object (for scripts)")
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 16:
        parser.error(f"--resolution must be a positive multiple of 16, got {args.resolution}")
    if args.with_text_encoder and args.mode != "sample":
        parser.error("--with-text-encoder plans sampling: use it with --mode sample")
    post_training = args.objective != "flow_matching" or args.lora_rank or args.lora_targets
    if post_training and args.mode != "train":
        parser.error("--objective, --lora-rank and --lora-targets plan training: use them with --mode train")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.lora_targets is not None and not args.lora_rank:
        parser.error("--lora-targets needs --lora-rank > 0")
    if args.frozen_dtype not in ("bfloat16", "float16", "float32"):
        parser.error(f"--frozen-dtype must be bfloat16, float16 or float32, got {args.frozen_dtype!r}")
    if args.microbatches < 1 or args.batch % args.microbatches:
        parser.error(f"--microbatches must be >= 1 and divide --batch {args.batch}, got {args.microbatches}")
    if (args.teachers != 1 or args.gan) and args.objective != "dmd":
        parser.error("--teachers and --gan plan DMD: use them with --objective dmd")
    if args.teachers < 1:
        parser.error(f"--teachers must be >= 1, got {args.teachers}")
    runs = DMD_CRITIC_UPDATES + 1
    if args.objective == "dmd" and args.batch % (runs * args.microbatches):
        parser.error(f"--objective dmd runs {runs} updates a step, each on its own slice of the batch: --batch must "
                     f"be a multiple of {runs} x --microbatches, got {args.batch}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from ernie_jax.parallel import parse_mesh

    sizes = parse_mesh(args.mesh)
    if any(size < 1 for size in sizes.values()):
        raise ValueError(f"--mesh sizes must be positive, got {args.mesh}")
    devices = math.prod(sizes.values())
    # The emulated devices must exist before JAX starts.
    # Without the CPU's loop-invariant code motion, no fp32 copies of whole weight stacks (see above).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
                               " --xla_disable_hlo_passes=while-loop-invariant-code-motion").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report = plan(args, sizes)
    budget = parse_bytes(args.device_memory)
    report["fits"] = report["total"] <= budget
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.component} {args.mode}, {args.resolution}x{args.resolution}, batch {args.batch}, mesh {args.mesh}"
          + (f", remat {args.remat}, {args.microbatches} microbatch(es), {args.objective}"
             + (f", {args.teachers} teacher(s)" + (", GAN head" if args.gan else "") if args.objective == "dmd" else "")
             + (f", LoRA rank {args.lora_rank}" if args.lora_rank else "") if args.mode == "train" else ""))
    for name in ("parameters", "optimizer state", "EMA weights", "frozen models", "inputs",
                 "temporaries (activations, workspace)", "outputs (not aliased)"):
        print(f"  {name:38s} {report[name] / 2**30:8.2f} GiB per device")
    if report["offloaded to host"]:
        print(f"  {'offloaded to host (not in the total)':38s} {report['offloaded to host'] / 2**30:8.2f} GiB per device")
    if "text encoder" in report:
        encoder = report["text encoder"]
        print(f"  text encoder, encoding {encoder['prompts']} prompts of {args.text_len} tokens:")
        for name in ("parameters", "inputs", "temporaries (activations, workspace)", "outputs (not aliased)"):
            print(f"    {name:36s} {encoder[name] / 2**30:8.2f} GiB per device")
        print(f"  {'denoising peak (+ encoder weights)':38s} {report['denoising peak'] / 2**30:8.2f} GiB per device")
        print(f"  {'encoding peak (+ DiT weights)':38s} {report['encoding peak'] / 2**30:8.2f} GiB per device")
    total = report["total"]
    verdict = "fits" if report["fits"] else "does NOT fit"
    print(f"  {'total':38s} {total / 2**30:8.2f} GiB per device: {verdict} in {budget / 2**30:.1f} GiB "
          f"(compiled in {report['compile_seconds']:.0f} s)")


def plan(args, sizes: dict[str, int]) -> dict:
    """AOT-compiles one step for the mesh and returns per-device byte counts (`parameters`, `optimizer
    state` and `EMA weights`: the trained variables'; `frozen models`: the frozen ones', each array once)."""
    import time

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ernie_jax import parallel
    from ernie_jax.models.dit import PRESETS, ErnieImageTransformer, abstract_transformer

    mesh = parallel.make_mesh(sizes)
    rules = parallel.INFERENCE_RULES if args.mode == "sample" else parallel.TRAINING_RULES
    if args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    config = PRESETS[args.preset]
    if args.num_layers:
        import dataclasses

        config = dataclasses.replace(config, num_layers=args.num_layers)
    training = args.mode == "train"
    model_kwargs = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32 if training else jnp.bfloat16,
                        remat=args.remat if training else "none", attention_impl=args.attention)
    latent = args.resolution // 16
    batch = args.batch * (1 if training else 2)  # CFG runs negative and positive prompts together

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, rules, shape))

    optimizer_bytes = ema_bytes = frozen_bytes = shared_bytes = 0
    rows = batch
    if training:
        # The trainer's step on the trainer's state and frozen states, as `training.loop.train` compiles them.
        from ernie_jax.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
        from ernie_jax.training.state import (
            TrainablePart,
            abstract_parts,
            abstract_train_state,
            shardings_of,
            with_shardings,
        )
        from ernie_jax.training.step import jit_train_step, make_train_step

        settings = OptimizerConfig()
        frozen_kwargs = {**model_kwargs, "param_dtype": jnp.dtype(args.frozen_dtype)}
        if args.lora_rank:
            from conversions.lora import BLOCK_LINEARS, diffusers_names
            from ernie_jax.models import lora

            targets = BLOCK_LINEARS if args.lora_targets is None else tuple(args.lora_targets.split(","))
            adapters = lora.LoRAConfig(rank=args.lora_rank, target_modules=targets)

            def build(rngs):
                base = ErnieImageTransformer(config, rngs=rngs, **frozen_kwargs)
                return lora.add_lora(base, adapters, rngs, diffusers_names(config))

            trained = lora.LoRAParam
        else:
            def build(rngs):
                return ErnieImageTransformer(config, rngs=rngs, **model_kwargs)

            trained = nnx.Param

        without_ema = {name for name in args.without_ema.split(",") if name}
        unknown = sorted(without_ema - {"transformer", "critic", "discriminator"})
        if unknown:
            raise ValueError(f"--without-ema names no trained part: {unknown} (transformer, critic, discriminator)")

        def trainable(name, build, trained=trained):
            return TrainablePart(build, make_optimizer(settings), ema_decay=0.0 if name in without_ema else 0.999,
                                 trained=trained, learning_rate=learning_rate_schedule(settings))

        parts = {"transformer": trainable("transformer", build)}
        if args.objective == "dmd":
            parts["critic"] = trainable("critic", build)
            if args.gan:
                from ernie_jax.models.gan_head import GANHead

                parts["discriminator"] = trainable(
                    "discriminator", lambda rngs: GANHead(config.hidden_size, DMD_GAN_HIDDEN, rngs=rngs), nnx.Param)
        graphdefs, train_state = abstract_train_state(parts, seed=0, mesh=mesh, rules=rules)
        params = train_state.params
        optimizer_bytes = _per_device_bytes(train_state.opt_state)
        ema_bytes = _per_device_bytes(train_state.ema_params)
        # A part's frozen rest (the LoRA base), placed by the rules as `training.state.part_rests` places it.
        frozen = {name: with_shardings(rest, mesh, rules) for name, rest in abstract_parts(parts, seed=0)[2].items()
                  if jax.tree.leaves(rest)}
        if args.objective == "dmd":
            objective, inputs, rows, shared_bytes = _dmd_step(args, config, build, graphdefs, frozen, frozen_kwargs,
                                                              mesh, rules, spec)
        elif args.objective == "dpo":
            from ernie_jax.training.objectives.dpo import DPO, DPOConfig

            objective = DPO(DPOConfig(beta=1.0))  # beta and the anchors' weights change no buffer
            if args.lora_rank:
                # The runner's reference: the base with the adapters switched off, on the base's arrays.
                model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
                graphdefs["reference"] = nnx.graphdef(lora.without_adapters(model))
                frozen["reference"] = frozen["transformer"]
                shared_bytes = _per_device_bytes(frozen["reference"])
            else:
                graphdefs["reference"], reference = nnx.split(abstract_transformer(config, **frozen_kwargs))
                frozen["reference"] = with_shardings(reference, mesh, rules)
            # The pairs' float32 latents and text features (the preference folders' contents).
            inputs = {"latents_chosen": spec((batch, config.in_channels, latent, latent), jnp.float32),
                      "latents_rejected": spec((batch, config.in_channels, latent, latent), jnp.float32),
                      "text_bth": spec((batch, args.text_len, config.text_in_dim), jnp.float32),
                      "text_lens": spec((batch,), jnp.int32)}
            rows = 2 * batch  # each network runs on the chosen and the rejected images together
        else:
            from ernie_jax.training.objectives.flow_matching import FlowMatching

            objective = FlowMatching()
            # The trainer's batch: float32 latents and text features (the frozen encoders' outputs).
            inputs = {"latents": spec((batch, config.in_channels, latent, latent), jnp.float32),
                      "text": spec((batch, args.text_len, config.text_in_dim), jnp.float32),
                      "text_lens": spec((batch,), jnp.int32)}
        frozen_bytes = _per_device_bytes(frozen) - shared_bytes
        train_step = make_train_step(parts, graphdefs, objective, microbatches=args.microbatches)
        arguments = (train_state, frozen, inputs)
        function = jit_train_step(train_step, mesh, rules, shardings_of(train_state), shardings_of(frozen),
                                  {k: v.sharding for k, v in inputs.items()})
    else:
        graphdef, weights = nnx.split(abstract_transformer(config, **model_kwargs))
        params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), weights,
                              parallel.state_shardings(weights, mesh, rules),
                              is_leaf=lambda x: isinstance(x, nnx.Variable))

        def forward(params, latents, timesteps, text, text_lens):
            return nnx.merge(graphdef, params)(latents, timesteps, text, text_lens)

        arguments = (params, spec((batch, config.in_channels, latent, latent), jnp.bfloat16),
                     spec((batch,), jnp.float32), spec((batch, args.text_len, config.text_in_dim), jnp.bfloat16),
                     spec((batch,), jnp.int32))
        function = parallel.jit_sharded(forward, mesh, rules, None, None)
    start = time.perf_counter()
    compiled = function.lower(*arguments).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    parameter_bytes = _per_device_bytes(params)
    # XLA counts an array passed twice (the LoRA base as the DPO reference) as two arguments; it is one buffer.
    argument_bytes = memory.argument_size_in_bytes - shared_bytes
    input_bytes = max(argument_bytes - parameter_bytes - optimizer_bytes - ema_bytes - frozen_bytes, 0)
    output_bytes = max(memory.output_size_in_bytes - memory.alias_size_in_bytes, 0)
    offloaded = memory.host_temp_size_in_bytes
    # A compiler that ignores memory kinds (XLA CPU) keeps the offloaded tensors in its device temporaries.
    device_temporaries = memory.temp_size_in_bytes
    if training and not offloaded:
        offloaded = _offloaded_bytes(args.remat, config, mesh, rules, rows // args.microbatches,
                                     (latent // config.patch_size) ** 2 + args.text_len)
        device_temporaries -= offloaded
    report = {"parameters": parameter_bytes, "optimizer state": optimizer_bytes, "EMA weights": ema_bytes,
              "frozen models": frozen_bytes, "inputs": input_bytes,
              "temporaries (activations, workspace)": device_temporaries, "outputs (not aliased)": output_bytes,
              "offloaded to host": offloaded, "flops": compiled.cost_analysis().get("flops", 0.0),
              "compile_seconds": seconds}
    report["total"] = argument_bytes + device_temporaries + output_bytes
    if args.with_text_encoder:
        encoder = _text_encoder_plan(mesh, rules, batch, args.text_len)
        report["text encoder"] = encoder
        report["denoising peak"] = report["total"] + encoder["parameters"]
        report["encoding peak"] = encoder["total"] + parameter_bytes
        report["total"] = max(report["denoising peak"], report["encoding peak"])
    return report


def _dmd_step(args, config, build, graphdefs, frozen, frozen_kwargs, mesh, rules, spec):
    """(objective, inputs, rows, shared bytes) of the DMD plan: adds the teachers (and with LoRA the critic's
    base, which is the student's) to `graphdefs` and `frozen`. Rows: the images one network forward sees (one
    update's slice of the batch)."""
    import jax.numpy as jnp
    from flax import nnx

    from ernie_jax.models.dit import abstract_transformer
    from ernie_jax.training.objectives import dmd
    from ernie_jax.training.objectives.flow_matching import EmptyPrompt
    from ernie_jax.training.state import with_shardings

    teachers = ("teacher", *(f"expert{index}" for index in range(1, args.teachers)))
    shared_bytes = 0
    for name in teachers:
        if args.lora_rank and name == "teacher":
            from ernie_jax.models import lora

            # As the runner builds them: the critic's adapters and the teacher (adapters off) on the student's base.
            model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
            graphdefs[name] = nnx.graphdef(lora.without_adapters(model))
            frozen["critic"] = frozen[name] = frozen["transformer"]
            shared_bytes = 2 * _per_device_bytes(frozen["transformer"])
        else:
            graphdefs[name], teacher = nnx.split(abstract_transformer(config, **frozen_kwargs))
            frozen[name] = with_shardings(teacher, mesh, rules)
    # The student grid's shift changes no buffer.
    settings = dmd.Config(teachers=teachers, student_steps=DMD_STUDENT_STEPS, student_shift=1.0,
                          critic_updates=DMD_CRITIC_UPDATES, gan_weight=0.03 if args.gan else 0.0,
                          gan_hidden=DMD_GAN_HIDDEN)
    # The empty prompt's features are a constant of the step (the runner's, from the text encoder).
    empty = EmptyPrompt(jnp.zeros((args.text_len, config.text_in_dim), jnp.float32), 1)
    latent = args.resolution // 16
    # The student's samples take their shape from the batch's latents (the GAN's real images).
    inputs = {"latents": spec((args.batch, config.in_channels, latent, latent), jnp.float32),
              "text": spec((args.batch, args.text_len, config.text_in_dim), jnp.float32),
              "text_lens": spec((args.batch,), jnp.int32)}
    return dmd.DMD(settings, empty), inputs, args.batch // (DMD_CRITIC_UPDATES + 1), shared_bytes


def _text_encoder_plan(mesh, rules, prompts: int, text_len: int) -> dict:
    """Per-device bytes of the real-size text encoder (bf16) encoding `prompts` token rows of `text_len`."""
    import time

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ernie_jax import parallel
    from ernie_jax.models import mistral

    abstract = mistral.abstract_model(mistral.PRESETS["text_encoder"], encoder_only=True, dtype=jnp.bfloat16,
                                      param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(abstract)
    params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state,
                          parallel.state_shardings(state, mesh, rules), is_leaf=lambda x: isinstance(x, nnx.Variable))
    input_ids = jax.ShapeDtypeStruct((prompts, text_len), jnp.int32,
                                     sharding=parallel.batch_sharding(mesh, rules, (prompts, text_len)))
    lengths = jax.ShapeDtypeStruct((prompts,), jnp.int32, sharding=parallel.batch_sharding(mesh, rules, (prompts,)))

    def encode(params, input_ids, lengths):
        return nnx.merge(graphdef, params).encode(input_ids, lengths)

    start = time.perf_counter()
    compiled = parallel.jit_sharded(encode, mesh, rules, None, None).lower(params, input_ids, lengths).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    parameter_bytes = _per_device_bytes(params)
    output_bytes = max(memory.output_size_in_bytes - memory.alias_size_in_bytes, 0)
    return {"prompts": prompts, "parameters": parameter_bytes,
            "inputs": max(memory.argument_size_in_bytes - parameter_bytes, 0),
            "temporaries (activations, workspace)": memory.temp_size_in_bytes, "outputs (not aliased)": output_bytes,
            "total": memory.argument_size_in_bytes + memory.temp_size_in_bytes + output_bytes,
            "compile_seconds": seconds}


def _offloaded_bytes(remat: str, config, mesh, rules, batch: int, tokens: int) -> int:
    """Per-device bytes of the per-layer tensors that `remat` offloads to host: each named `[B, S, D]`
    bf16 activation, once per layer."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from ernie_jax import parallel
    from ernie_jax.models.dit import ACTIVATION_AXES
    from ernie_jax.models.layers import REMAT_OFFLOADED_NAMES

    names = REMAT_OFFLOADED_NAMES.get(remat, ())
    if not names:
        return 0
    shape = (batch, tokens, config.hidden_size)
    shard = NamedSharding(mesh, parallel.logical_to_spec(ACTIVATION_AXES, rules, shape, mesh)).shard_shape(shape)
    return len(names) * config.num_layers * int(np.prod(shard)) * jax.numpy.dtype("bfloat16").itemsize


def _per_device_bytes(tree) -> int:
    """Bytes that the first device holds of an abstract tree with shardings."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


if __name__ == "__main__":
    from conversions.common import run_command

    sys.exit(run_command(main))
