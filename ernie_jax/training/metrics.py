"""Training logs: TensorBoard event files (scalars and images), a progress bar, and a reader for the event
files (for tests and notebooks).

    writer = TensorBoardWriter("workdir/logs")
    bar = ProgressBar(num_steps, batch_size_at=lambda step: 32)
    loop.train(..., callbacks=[bar, writer.train_callback(every=10)])
    read_scalars("workdir/logs")["train/loss"]     # [(step, value), ...]

Steps in the logs count updates done: the callback of update `s` (the state's step before it) logs at
step `s + 1`, the step its checkpoint carries.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

EVENT_FILE_MARKER = "tfevents"


class TensorBoardWriter:
    """Scalars and images as TensorBoard event files under `logdir` (tensorboardX's writer).

    `purge_step`: the first step this writer logs. A resumed run passes it, so that TensorBoard (and
    `read_scalars`) hide what an earlier, killed run logged from that step on, which this run logs again."""

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """`image` uint8 `[H, W, 3]`."""
        self._writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        self._writer.flush()

    def train_callback(self, every: int, extra: Callable[[], dict[str, float]] | None = None):
        """A `loop.train` callback writing the update's metrics as `train/NAME` every `every` updates, with the
        scalars of `extra()` (e.g. data statistics) beside them."""
        if every < 1:
            raise ValueError(f"the logging interval must be >= 1, got {every}")

        def log(step: int, metrics: dict[str, float], state) -> None:
            if (step + 1) % every == 0:
                values = {f"train/{name}": value for name, value in metrics.items()}
                self.scalars(step + 1, {**values, **(extra() if extra is not None else {})})

        return log

    def close(self) -> None:
        self._writer.close()


class ProgressBar:
    """A `loop.train` callback drawing a tqdm bar with the loss (each update's, `NAME/loss`, for objectives
    with several updates), steps/s and images/s (over the updates since the previous refresh). `batch_size_at(step)` is the global batch of update `step`."""

    def __init__(self, num_steps: int, batch_size_at: Callable[[int], int], *, start_step: int = 0,
                 description: str = "train", refresh_seconds: float = 1.0):
        self._bar = tqdm(total=num_steps, initial=start_step, desc=description, unit="step", dynamic_ncols=True)
        self._batch_size_at = batch_size_at
        self._refresh_seconds = refresh_seconds
        self._since = time.perf_counter()
        self._steps = 0
        self._images = 0

    def __call__(self, step: int, metrics: dict[str, float], state) -> None:
        self._steps += 1
        self._images += self._batch_size_at(step)
        self._bar.update(1)
        elapsed = time.perf_counter() - self._since
        if elapsed >= self._refresh_seconds or self._bar.n == self._bar.total:
            losses = {k: f"{v:.4f}" for k, v in metrics.items() if k == "loss" or k.endswith("/loss")}
            self._bar.set_postfix({**losses, "steps_per_s": f"{self._steps / elapsed:.2f}",
                                   "images_per_s": f"{self._images / elapsed:.1f}"})
            self._since, self._steps, self._images = time.perf_counter(), 0, 0

    def close(self) -> None:
        self._bar.close()


def _records(path: Path):
    """The payloads of a TFRecord file (length, its CRC, payload, its CRC; CRCs not checked)."""
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + 12
        if start + length + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {offset}")
        yield data[start:start + length]
        offset = start + length + 4


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `logdir`: tag -> [(step, value)] in file order, less what a
    later writer's `purge_step` hides (as TensorBoard shows them)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    files = sorted(p for p in Path(logdir).rglob("*") if EVENT_FILE_MARKER in p.name and p.is_file())
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file under {logdir}")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        for payload in _records(path):
            event = Event.FromString(payload)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: [(step, value) for step, value in values if step < event.step]
                           for tag, values in scalars.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars
