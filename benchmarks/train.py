"""One DiT training step: ernie_jax's `make_train_step` (jitted) vs the same step written in PyTorch around
the diffusers `ErnieImageTransformer2DModel` (eager), same config, weights, batch and optimizer, fp32.

A step on either side: draw noise and sigma (logit-normal, unshifted), flow-matching loss (mean squared
error of the velocity `eps - x0`), backward, global-norm clipping at 1.0, AdamW (lr 1e-4 on our
schedule, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on matrices only) and an EMA of the weights
(decay 0.9999: ours always keeps one, so the torch step updates one too, with `lerp_`). Torch uses
`torch.optim.AdamW` with its default implementation and `torch.nn.utils.clip_grad_norm_`.

Correctness guard: the torch model gets ernie_jax's initial weights, and the first two steps of both sides
use ernie_jax's noise and sigmas; their losses and gradient norms are printed side by side (the second
step also checks the optimizer update). These steps also compile the JAX step; the compile time is
printed.

Timing: `--blocks` blocks per side in alternating order (J T, T J, ...), each of `--warmup` untimed steps
and `--steps` timed ones (torch draws its own noise in these); median, best and worst seconds per step,
steps/s, images/s, the ratio, and the achieved FLOP/s as a fraction of the fp32 matmul peak measured at the
start of the run. Model FLOPs per step (recomputation under remat not counted) are three times the
forward's matmul FLOPs (`benchmarks.common.forward_flops`), the backward doing two matmuls per forward one:

    6 * B * S * (4 D^2 + 3 D F) * L + 12 * B * S^2 * D * L                 (blocks: projections, attention)
    + 6 * B * (N_img * C * D + T * D_text * D + N_img * D * C_out + 10 D^2)  (embeddings, head, conditioning)

with S = N_img + T tokens (image grid + padded text), D hidden, F ffn width, L layers.

    python benchmarks/train.py [--preset small] [--batch 2] [--resolution 256] [--blocks 4] [--steps 2]
                               [--warmup 1] [--remat none] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import MachineLoad, alternating_times, forward_flops, matmul_peak  # noqa: E402
from conversions.transformer import diffusers_config, transformer_state_dict  # noqa: E402
from ernie_jax import parallel  # noqa: E402
from ernie_jax.models.dit import PRESETS, ErnieImageTransformer  # noqa: E402
from ernie_jax.models.layers import REMAT_POLICIES  # noqa: E402
from ernie_jax.training.objectives import example_keys, flow_matching  # noqa: E402
from ernie_jax.training import optimizer as optimizers  # noqa: E402
from ernie_jax.training import step as train_step  # noqa: E402
from ernie_jax.training.state import TrainablePart, create_train_state, shardings_of  # noqa: E402

TEXT_LEN = 64
LATENT_DOWNSAMPLE = 16  # pixels per latent cell: the FLUX.2 VAE's 8x, then 2x2 patchified into 128 channels
EMA_DECAY = 0.9999
OPTIMIZER = optimizers.OptimizerConfig(weight_decay=0.01)
OBJECTIVE = flow_matching.FlowMatchingConfig()
CHECKED_STEPS = 2


def make_batch(config, batch: int, grid: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Clean latents `[B, C, grid, grid]`, text features `[B, TEXT_LEN, D_text]` zero-padded beyond random
    lengths `[B]` in [TEXT_LEN / 4, TEXT_LEN]."""
    rng = np.random.default_rng(seed)
    text_lens = rng.integers(TEXT_LEN // 4, TEXT_LEN + 1, batch)
    text = rng.standard_normal((batch, TEXT_LEN, config.text_in_dim), np.float32)
    text *= (np.arange(TEXT_LEN)[None, :] < text_lens[:, None])[..., None]
    return {"latents": rng.standard_normal((batch, config.in_channels, grid, grid), np.float32), "text": text,
            "text_lens": text_lens.astype(np.int32)}


class JaxTrainer:
    """ernie_jax's train state and compiled step on one device, stepping on a fixed batch."""

    def __init__(self, config, batch: dict[str, np.ndarray], remat: str):
        mesh = parallel.make_mesh({})
        rules = parallel.TRAINING_RULES
        optimizer = optimizers.make_optimizer(OPTIMIZER)
        parts = {"transformer": TrainablePart(lambda rngs: ErnieImageTransformer(config, remat=remat, rngs=rngs),
                                              optimizer, ema_decay=EMA_DECAY,
                                              learning_rate=optimizers.learning_rate_schedule(OPTIMIZER))}
        graphdefs, self.state = create_train_state(parts, seed=0, mesh=mesh, rules=rules)
        self.graphdef = graphdefs["transformer"]
        step = train_step.make_train_step(parts, graphdefs, flow_matching.FlowMatching(OBJECTIVE))
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        jitted = train_step.jit_train_step(step, mesh, rules, shardings_of(self.state), {},
                                           train_step.batch_shardings(mesh, rules, self.batch))
        start = time.perf_counter()
        self.compiled = jitted.lower(self.state, {}, self.batch).compile()
        self.compile_seconds = time.perf_counter() - start

    def torch_state_dict(self) -> dict[str, torch.Tensor]:
        """The current parameters in diffusers' layout."""
        model = nnx.merge(self.graphdef, self.state.params["transformer"])
        return {k: torch.tensor(v) for k, v in transformer_state_dict(model).items()}

    def next_draw(self) -> flow_matching.NoiseDraw:
        """The noise and sigmas that the next step will draw."""
        shape = self.batch["latents"].shape
        return flow_matching.draw_noise(example_keys(train_step.step_key(self.state), shape[0]), shape, OBJECTIVE)

    def step(self) -> dict[str, jax.Array]:
        """One update; returns the step's metrics (loss, mse, grad_norm, learning_rate)."""
        self.state, metrics = self.compiled(self.state, {}, self.batch)
        jax.block_until_ready(self.state)
        return metrics


class TorchTrainer:
    """The same training step in PyTorch around the diffusers model, on the same batch."""

    def __init__(self, config, state_dict: dict[str, torch.Tensor], batch: dict[str, np.ndarray], max_steps: int):
        from diffusers import ErnieImageTransformer2DModel

        self.model = ErnieImageTransformer2DModel.from_config(diffusers_config(config)).train()
        self.model.load_state_dict(state_dict, strict=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Decay weight matrices and the patch-embedding kernel only, as ernie_jax's optimizer does (its
        # `kernel` leaves); torch's norm weights and biases are the 1-d tensors.
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": OPTIMIZER.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=OPTIMIZER.learning_rate, betas=(OPTIMIZER.b1, OPTIMIZER.b2),
                                           eps=OPTIMIZER.eps)
        self.ema = [p.detach().clone() for p in self.params]
        # ernie_jax's schedule, evaluated up front so that no JAX call lands inside a torch step.
        schedule = optimizers.learning_rate_schedule(OPTIMIZER)
        self.learning_rates = np.asarray(jax.vmap(schedule)(jnp.arange(max_steps))).tolist()
        self.count = 0
        self.latents, self.text, self.text_lens = (torch.from_numpy(batch[k]) for k in train_step.BATCH_KEYS)
        self.generator = torch.Generator().manual_seed(0)

    def step(self, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[float, float]:
        """One update with the given noise `[B, C, H, W]` and sigmas `[B]`; returns (loss, grad norm before
        clipping)."""
        sigma_b = sigmas.view(-1, 1, 1, 1)
        x_sigma = (1 - sigma_b) * self.latents + sigma_b * noise
        prediction = self.model(x_sigma, sigmas * 1000.0, self.text, self.text_lens, return_dict=False)[0]
        loss = torch.mean(torch.square(prediction - (noise - self.latents)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, OPTIMIZER.clip_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rates[self.count]
        self.optimizer.step()
        with torch.no_grad():
            for average, param in zip(self.ema, self.params, strict=True):
                average.lerp_(param, 1 - EMA_DECAY)
        self.count += 1
        return loss.item(), grad_norm.item()

    def timed_step(self) -> None:
        """A step on noise drawn here (standard normal; sigma = sigmoid(N(0, 1)), as OBJECTIVE draws)."""
        noise = torch.randn(self.latents.shape, generator=self.generator)
        sigmas = torch.sigmoid(torch.randn(self.latents.shape[0], generator=self.generator))
        self.step(noise, sigmas)


def check_first_steps(ours: JaxTrainer, reference: TorchTrainer) -> None:
    """Both sides' first steps on ernie_jax's noise: losses and gradient norms side by side."""
    for index in range(CHECKED_STEPS):
        draw = ours.next_draw()
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in ours.step().items()}
        jax_s = time.perf_counter() - start
        start = time.perf_counter()
        loss, grad_norm = reference.step(torch.tensor(np.asarray(draw.noise)), torch.tensor(np.asarray(draw.sigmas)))
        torch_s = time.perf_counter() - start
        print(f"  check step {index}: loss jax {metrics['loss']:.9g} torch {loss:.9g} "
              f"(rel. diff {abs(metrics['loss'] - loss) / abs(loss):.1e}); grad norm jax {metrics['grad_norm']:.7g} "
              f"torch {grad_norm:.7g} (rel. diff {abs(metrics['grad_norm'] - grad_norm) / abs(grad_norm):.1e}); "
              f"untimed: jax {jax_s:.2f} s, torch {torch_s:.2f} s")


def describe(name: str, times: list[float], batch: int, flops: float, peak: float) -> str:
    median = statistics.median(times)
    return (f"  {name:5s} {median:7.3f} s/step (best {min(times):.3f}, worst {max(times):.3f}, n={len(times)})  "
            f"{1 / median:6.3f} steps/s  {batch / median:6.3f} images/s  "
            f"{flops / median / 1e9:6.1f} GFLOP/s = {flops / median / peak:5.1%} of peak")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent grid = /16)")
    parser.add_argument("--blocks", type=int, default=4, help="timing blocks per side, in alternating order")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each block")
    parser.add_argument("--remat", default="none", choices=sorted(REMAT_POLICIES), help="ernie_jax remat policy")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU cores for both sides (the process is pinned to the first N)")
    args = parser.parse_args()
    if args.resolution <= 0 or args.resolution % LATENT_DOWNSAMPLE:
        parser.error(f"--resolution must be a positive multiple of {LATENT_DOWNSAMPLE}, got {args.resolution}")
    for name in ("batch", "blocks", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main() -> None:
    args = parse_args()
    # Before either runtime starts its thread pool, which then sizes itself to these cores.
    if args.threads < os.cpu_count():
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]
    grid = args.resolution // LATENT_DOWNSAMPLE
    num_image = grid * grid
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; fp32; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    peak = matmul_peak(6)
    print(f"fp32 matmul peak measured here: {peak / 1e9:.1f} GFLOP/s")

    batch = make_batch(config, args.batch, grid)
    ours = JaxTrainer(config, batch, args.remat)
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours.state.params))
    flops = 3 * forward_flops(config, args.batch, num_image, TEXT_LEN)
    print(f"preset {args.preset} ({parameters / 1e6:.1f}M parameters), batch {args.batch} at {args.resolution}^2: "
          f"{num_image} image + {TEXT_LEN} text tokens (lengths {batch['text_lens'].tolist()}), remat "
          f"{args.remat}; {flops / 1e9:.1f} GFLOP per step; jax step compiled in {ours.compile_seconds:.1f} s")
    total_steps = CHECKED_STEPS + args.blocks * (args.warmup + args.steps)
    reference = TorchTrainer(config, ours.torch_state_dict(), batch, total_steps)
    check_first_steps(ours, reference)

    load = MachineLoad()
    start_load = os.getloadavg()[0]
    start = time.perf_counter()
    jax_times, torch_times = alternating_times([ours.step, reference.timed_step], args.blocks, args.steps,
                                               args.warmup)
    print(f"timing ({time.perf_counter() - start:.0f} s; load average {start_load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; {load.report()}):")
    print(describe("jax", jax_times, args.batch, flops, peak))
    print(describe("torch", torch_times, args.batch, flops, peak))
    print(f"  jax speed-up: {statistics.median(torch_times) / statistics.median(jax_times):.2f}x median, "
          f"{min(torch_times) / min(jax_times):.2f}x best")


if __name__ == "__main__":
    main()
