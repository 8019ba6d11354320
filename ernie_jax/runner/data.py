"""The runner's data: record sources by name, precomputed features checked against the frozen components,
and the frozen VAE and text encoder that turn a data-pipeline batch into the train step's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.runner.config import SHAPES_SOURCE, Experiment

if TYPE_CHECKING:
    from ernie_jax.data.precomputed import PrecomputedSource


def open_source(spec: str, experiment: Experiment, split: str):
    """A record source: "shapes" (the synthetic dataset's `split`), a tfds dataset folder or an image folder."""
    if spec == SHAPES_SOURCE:
        from ernie_jax.data.shapes import ShapesSource

        s = experiment.config.data.shapes
        num = s.num_records if split == "train" else s.num_eval_records
        return ShapesSource(experiment.shapes_config(), split, num)
    from ernie_jax.data.precompute import open_source as open_path

    if not Path(spec).is_dir():
        raise ValueError(f"data source {spec!r} is neither 'shapes' nor a folder")
    return open_path(spec)


def checked_sources(experiment: Experiment, entries: list, source_class) -> list:
    """Each entry (a folder, or a list of a side's host shards) as a `source_class` (a PrecomputedSource),
    checked against the experiment's frozen components: the features must come from the text encoder and VAE
    that sample grids, eval loss and export use, and keep no more text tokens than the step is compiled for."""
    from ernie_jax.data.precompute import model_fingerprint

    expected = model_fingerprint(experiment.components_dir)
    sources = []
    for entry in entries:
        source = source_class(entry if isinstance(entry, str) else list(entry))
        if source.metadata["model_fingerprint"] != expected:
            raise ValueError(f"precomputed features {entry!r} were made with other encoders than "
                             f"{experiment.components_dir} (model fingerprints differ)")
        if source.metadata["max_text_len"] > experiment.config.data.max_text_len:
            raise ValueError(f"precomputed features {entry!r} keep up to {source.metadata['max_text_len']} "
                             f"text tokens, more than config.data.max_text_len "
                             f"{experiment.config.data.max_text_len}")
        sources.append(source)
    return sources


def precomputed_records(experiment: Experiment, entry) -> PrecomputedSource:
    """One entry of `experiment.precomputed()` (a folder or a list of a side's host shards) as a checked
    PrecomputedSource."""
    from ernie_jax.data.precomputed import PrecomputedSource

    return checked_sources(experiment, [entry], PrecomputedSource)[0]


def precomputed_sources(experiment: Experiment) -> list:
    """`experiment.precomputed()` as checked PrecomputedSources; when the objective reads teacher ODE pairs,
    the `ode_pairs` stage's folders of those records instead, as checked OdePairSources."""
    from ernie_jax.data.precomputed import PrecomputedSource
    from ernie_jax.runner.stages import ode_pairs

    if not ode_pairs.wanted(experiment):
        return checked_sources(experiment, experiment.precomputed(), PrecomputedSource)
    from ernie_jax.data.ode_pairs import OdePairSource

    entries = ode_pairs.folders(experiment)
    missing = [folder for entry in entries for folder in entry if not Path(folder).is_dir()]
    if missing:
        raise ValueError(f"the objective reads teacher ODE pairs, but {missing[0]} does not exist: run the "
                         f"'ode_pairs' stage (in config.stages after 'precompute', before 'train')")
    return checked_sources(experiment, entries, OdePairSource)


def preference_sources(experiment: Experiment) -> list:
    """The preference folders DPO reads, as checked PreferenceSources: `data.preferences` (entries as
    `data.precomputed`'s), or the pairs stage's folders; empty for other training."""
    from ernie_jax.data.preferences import PreferenceSource
    from ernie_jax.runner.stages.pairs import folders

    entries = list(experiment.config.data.get("preferences", ()))
    if not entries and "pairs" in experiment.config.stages:
        entries = [folders(experiment)]
    return checked_sources(experiment, entries, PreferenceSource)


class FrozenEncoders:
    """The train step's batch from the data pipeline's: the frozen VAE on the images (one compile per bucket)
    and the text encoder on the captions (features cut or zero-padded to `max_text_len` tokens)."""

    def __init__(self, encoders, max_text_len: int):
        self.encoders = encoders
        self.max_text_len = max_text_len
        self._vae_graphdef, self._vae_state = nnx.split(encoders.vae)

    def latents(self, images: np.ndarray) -> jax.Array:
        """uint8 `[B, h, w, 3]` -> normalised packed latents `[B, C, h', w']` float32."""
        from ernie_jax.data.precompute import encode_images, vae_input

        latents = encode_images(self._vae_graphdef, self._vae_state, jnp.asarray(vae_input(np.asarray(images))))
        return latents.astype(jnp.float32)

    def text(self, captions) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> features float32 `[B, max_text_len, D]` (cut, then zero-padded) and lengths int32 `[B]`."""
        from ernie_jax.data.precomputed import batch_text_features

        features = [np.asarray(f[: self.max_text_len], np.float32)
                    for f in self.encoders.encode_prompt([str(c) for c in captions])]
        return batch_text_features(features, self.max_text_len)

    def __call__(self, batch: dict) -> dict:
        text, lengths = self.text(batch["captions"])
        return {"latents": self.latents(batch["images"]), "text": text, "text_lens": lengths}

    def empty_prompt(self):
        from ernie_jax.training.objectives.flow_matching import EmptyPrompt

        text, lengths = self.text([""])
        return EmptyPrompt(text[0, : lengths[0]], int(lengths[0]))
