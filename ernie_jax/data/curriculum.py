"""The resolution curriculum: contiguous step ranges, each with its bucket set and global batch size.

The report trains 256^2 -> 512^2 -> 1024^2, multi-aspect throughout, without giving stage lengths
(training_algorithms.md sections 6 and 8.11); the lengths are therefore config values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ernie_jax.data.buckets import as_buckets, stage_buckets


@dataclasses.dataclass(frozen=True)
class Stage:
    """Steps [start_step, end_step) train on `buckets` with `batch_size` images per step over all hosts.

    `end_step=None` makes the stage open-ended (allowed for the last stage only). `buckets` holds
    `(height, width)` pairs or Buckets.
    """

    start_step: int
    end_step: int | None
    buckets: tuple
    batch_size: int
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "buckets", as_buckets(self.buckets))
        label = self.name or f"stage starting at step {self.start_step}"
        if self.start_step < 0:
            raise ValueError(f"{label}: start_step {self.start_step} is negative")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"{label}: end_step {self.end_step} must exceed start_step {self.start_step}")
        if self.batch_size <= 0:
            raise ValueError(f"{label}: batch_size {self.batch_size} must be positive")

    def contains(self, step: int) -> bool:
        return self.start_step <= step and (self.end_step is None or step < self.end_step)


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """Stages covering steps 0.. without gaps or overlaps, in order."""

    stages: tuple[Stage, ...]

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ValueError("a curriculum needs at least one stage")
        if self.stages[0].start_step != 0:
            raise ValueError(f"the first stage starts at step {self.stages[0].start_step}, not 0")
        for index, (stage, following) in enumerate(zip(self.stages, self.stages[1:])):
            if stage.end_step is None:
                raise ValueError(f"stage {index} is open-ended but stage {index + 1} follows it")
            if following.start_step != stage.end_step:
                kind = "gap" if following.start_step > stage.end_step else "overlap"
                raise ValueError(f"{kind} between stage {index} (ends at step {stage.end_step}) and "
                                 f"stage {index + 1} (starts at step {following.start_step})")

    @property
    def total_steps(self) -> int | None:
        """Steps the curriculum covers; None when the last stage is open-ended."""
        return self.stages[-1].end_step

    def stage_index(self, step: int) -> int:
        """Index of the stage that contains `step`."""
        for index, stage in enumerate(self.stages):
            if stage.contains(step):
                return index
        raise ValueError(f"step {step} is outside the curriculum (steps 0..{self.total_steps})")

    def stage_at(self, step: int) -> Stage:
        return self.stages[self.stage_index(step)]


def progressive_curriculum(stage_steps: Sequence[int | None], batch_sizes: Sequence[int],
                           sides: Sequence[int] = (256, 512, 1024)) -> Curriculum:
    """The report's schedule: stage k lasts `stage_steps[k]` steps on `stage_buckets(sides[k])`.

    The last entry of `stage_steps` may be None (train on until stopped).
    """
    if not len(stage_steps) == len(batch_sizes) == len(sides):
        raise ValueError(f"stage_steps {list(stage_steps)}, batch_sizes {list(batch_sizes)} and "
                         f"sides {list(sides)} must have the same length")
    if any(steps is None for steps in stage_steps[:-1]):
        raise ValueError(f"only the last stage may be open-ended, got stage_steps {list(stage_steps)}")
    stages, start = [], 0
    for steps, batch_size, side in zip(stage_steps, batch_sizes, sides):
        end = None if steps is None else start + steps
        stages.append(Stage(start, end, stage_buckets(side), batch_size, name=f"{side}px"))
        start = end
    return Curriculum(tuple(stages))

