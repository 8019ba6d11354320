"""The optimizer: global-norm clipping, then AdamW on a linear-warmup + cosine-decay learning rate.

The parameters it updates are the float32 master weights; the model casts them to its compute dtype
(bf16 on accelerators) inside each layer, so gradients and Adam moments are float32 as well.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters. The rate rises linearly from 0 to `learning_rate` over `warmup_steps`,
    then follows a cosine down to `learning_rate * final_lr_fraction` at `decay_steps` (counted from 0,
    warm-up included) and stays there. Weight decay applies to weight matrices and conv kernels (leaves
    named `kernel`) only, not to biases and norm scales. `clip_norm` <= 0 disables clipping."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    decay_steps: int = 100_000
    final_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0

    def __post_init__(self):
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate!r}")
        if self.warmup_steps < 0 or self.decay_steps <= self.warmup_steps:
            raise ValueError(f"need 0 <= warmup_steps < decay_steps, got {self.warmup_steps}, {self.decay_steps}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction!r}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """step -> learning rate."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.decay_steps, end_value=config.learning_rate * config.final_lr_fraction)


def _leaf_name(path) -> str:
    # The last dict key: an nnx.State path ends in the Variable's `.value` attribute after it.
    return next((str(key.key) for key in reversed(path) if isinstance(key, jax.tree_util.DictKey)), "")


def _kernels(params):
    # By name, not by rank: scanned blocks stack their biases and norm scales to [L, D].
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) == "kernel", params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> adamw(schedule), over float32 parameters."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=_kernels)
    if config.clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
