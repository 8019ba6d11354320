"""Train-state checkpoints: an Orbax CheckpointManager (asynchronous saves, the newest `max_to_keep` kept)
holding the train state and the data iterator's position at the same step.

A step's folder appears only once all of it is written (Orbax writes to a temporary folder and renames
it), so a process killed mid-save leaves the previous checkpoints intact and `latest_step` never
names a half-written one. The data iterator is a grain `DatasetIterator` (e.g.
`MapDataset.to_iter_dataset()`) or `DataLoader` iterator; each process saves its own position.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

from ernie_jax.training.state import TrainState

STATE = "state"
DATA = "data"


class Checkpoints:
    """`save(step, state, data_iterator)` / `restore(abstract_state, data_iterator)` under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    def latest_step(self) -> int | None:
        """The newest completely written step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator=None, *, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's current position) as `step`; returns once the arrays
        are copied off the devices, so the next update may overwrite (donate) them."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: TrainState, data_iterator=None, *, step: int | None = None) -> TrainState:
        """The state of `step` (default: the latest) placed in `abstract_state`'s shardings; moves
        `data_iterator` (if given) to the position saved with it."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]

    def restore_weights(self, abstract_state: TrainState, *, ema: bool = True, step: int | None = None):
        """{part: weights} of `step` (default: the latest) in `abstract_state`'s shardings: each part's EMA
        (a part that keeps none: its trained weights), or with `ema=False` the trained ones. What an export
        needs, without reading the optimizer state (twice the weights) or the other copy of the weights."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        averaged = abstract_state.ema_params if ema else {}
        trained = {name: weights for name, weights in abstract_state.params.items() if name not in averaged}
        item = {field: tree for field, tree in (("params", trained), ("ema_params", averaged)) if tree}
        # A checkpointer of its own: the manager's item handler is the StandardCheckpointHandler of save/restore.
        with ocp.PyTreeCheckpointer() as checkpointer:
            # Restore args from the abstract tree: the arrays land in its shardings, not in those the file records
            # (which need not exist on the restoring topology).
            restored = checkpointer.restore(os.path.join(self.directory, str(step), STATE), args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        return {**restored.get("params", {}), **restored.get("ema_params", {})}

    def wait_until_finished(self) -> None:
        """Blocks until the pending asynchronous save (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
