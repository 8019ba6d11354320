"""The frozen components of a from-scratch experiment on the bundled shapes dataset, made as its first
stage and written as a diffusers-layout ERNIE-Image pipeline folder (the DiT is a random placeholder
until the experiment's training replaces it):

- tokenizer: word level over the dataset's closed prompt vocabulary (`shapes.prompt_vocabulary()`: the
  captions' words, then the few more of styled prompts for SFT), with the special tokens of the
  released Mistral tokenizer that the pipeline uses (<unk> 0, <s> 1, </s> 2, <pad> 3) and
  its post-processor (a <s> in front of every prompt). Whitespace splits words and every punctuation mark
  is a token of its own, so '"SUN",' is `"`, `SUN`, `"`, `,`.
- text encoder: a tiny Mistral (the released text encoder's architecture) with random, frozen weights.
  Training it is unnecessary: the DiT reads the text only through its trainable `text_proj` and
  attention, and random features are a deterministic, practically injective function of the token
  sequence (causal attention makes each position's feature depend on the whole prefix), which is all
  the DiT needs to tell captions apart. `feature_separation` measures it.
- VAE: a FLUX.2-architecture `AutoencoderKLFlux2`, small and trained on the dataset's images
  (`training.autoencoder`), with BatchNorm statistics fitted so the DiT's latents are about N(0, 1).

    components = build_components("runs/shapes/pipeline", shapes_config=ShapesConfig())
    pipe = ErnieImagePipeline.from_pretrained("runs/shapes/pipeline", dtype="float32")

Measured with the defaults at 64x64 (`SHAPES_VAE`, 400 steps of 8 images, 2-core CPU shared with other
work, load average 6-7): 267 s of process CPU time in all, of which 21 s compilation and 0.55 s per
step; the detector (`evaluation.shapes_detector.score_images`) reads the reconstructions of 200 held-out
records as it reads the originals (colour, shape, position, object, text 1.0; count and all 0.995), PSNR
30.1 dB. 600 steps: 358 s CPU, every metric 1.0, PSNR 33.8 dB. Random text features of 379 distinct
captions: `feature_separation` 0.67.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from tokenizers import models, pre_tokenizers, processors

from conversions.common import atomic_directory
from conversions.random_checkpoint import (
    save_tokenizer_folder,
    write_pipeline_components,
)
from ernie_jax.data import shapes
from ernie_jax.models import mistral
from ernie_jax.models.dit import PRESETS as DIT_PRESETS
from ernie_jax.models.dit import ErnieImageConfig, init_transformer
from ernie_jax.models.vae import AutoencoderKLFlux2, VAEConfig, init_vae
from ernie_jax.training import autoencoder

# The released Mistral tokenizer's first ids (its pad, 11, is one of its control tokens; we have none).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(len(SPECIAL_TOKENS))
TOKENIZER_MAX_LENGTH = 128



def shapes_vae(block_out_channels: Sequence[int] = (16, 32, 64), latent_channels: int = 32) -> VAEConfig:
    """A narrow FLUX.2-architecture VAE for the shapes images: one resnet per encoder block (two per decoder
    block), downsampling x2 ** (len(block_out_channels) - 1); a DiT input token is a 2x2 patch of latents
    (4 * latent_channels channels, 128 in the released VAE) covering 2 ** len(block_out_channels) pixels a
    side (16 for the released VAE's four blocks)."""
    blocks = len(block_out_channels)
    return VAEConfig(block_out_channels=tuple(block_out_channels), latent_channels=latent_channels,
                     layers_per_block=1, norm_num_groups=8, sample_size=64,
                     down_block_types=("DownEncoderBlock2D",) * blocks,
                     up_block_types=("UpDecoderBlock2D",) * blocks)


# 64x64 images -> 16x16x32 latents (x4 down, three blocks) -> 8x8 DiT tokens of 128 channels. Narrow
# full-resolution blocks keep a training step cheap on CPU.
SHAPES_VAE = shapes_vae()
SHAPES_VAE_TRAINING = autoencoder.AutoencoderTrainConfig()
# The tiny test text encoder's layers (reference section 7) over the caption vocabulary.
SHAPES_TEXT_ENCODER = dataclasses.replace(
    mistral.PRESETS["tiny_text_encoder"], vocab_size=len(SPECIAL_TOKENS) + len(shapes.prompt_vocabulary()),
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def caption_tokenizer(vocabulary: Sequence[str]) -> tokenizers.Tokenizer:
    """A word-level `tokenizers.Tokenizer`: `SPECIAL_TOKENS` then `vocabulary` in order, unknown words ->
    <unk>, a <s> prepended when special tokens are added."""
    words = list(dict.fromkeys(vocabulary))
    clashes = sorted(set(words) & set(SPECIAL_TOKENS))
    if clashes or not words or any(not w or any(c.isspace() for c in w) for w in words):
        raise ValueError(f"caption_tokenizer: the vocabulary must be non-empty words without whitespace and "
                         f"without the special tokens {SPECIAL_TOKENS}; bad entries: {clashes or words[:5]}")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    return tokenizer


def write_caption_tokenizer(folder, vocabulary: Sequence[str], model_max_length: int = TOKENIZER_MAX_LENGTH):
    """`caption_tokenizer(vocabulary)` as a tokenizer folder (which must not exist) that
    `ernie_jax.tokenizer.Tokenizer.from_folder` and transformers' `AutoTokenizer` read."""
    save_tokenizer_folder(Path(folder), caption_tokenizer(vocabulary), model_max_length=model_max_length)


def image_batches(config: shapes.ShapesConfig, batch_size: int, split: str = "train", start: int = 0
                  ) -> Iterator[np.ndarray]:
    """Endless uint8 `[batch_size, H, W, 3]` batches of records start, start + 1, ... of `split`."""
    for first in itertools.count(start, batch_size):
        yield np.stack([shapes.make_example(config, split, i)["image"] for i in range(first, first + batch_size)])


def encode_captions(text_encoder: mistral.MistralModel, tokenizer: tokenizers.Tokenizer, captions: Sequence[str]
                    ) -> list[np.ndarray]:
    """The text encoder's features `[T_i, D]` of each caption, tokenized as the pipeline does (<s> first)."""
    ids = [tokenizer.encode(c).ids for c in captions]
    lengths = np.array([len(i) for i in ids], np.int32)
    batch = np.full((len(ids), int(lengths.max())), PAD_ID, np.int32)
    for row, token_ids in zip(batch, ids):
        row[: len(token_ids)] = token_ids
    graphdef, state = nnx.split(text_encoder)
    features = jax.jit(lambda s, b, n: nnx.merge(graphdef, s).encode(b, n))(state, jnp.asarray(batch), lengths)
    return [np.asarray(features[i, :n]) for i, n in enumerate(lengths)]


def feature_separation(features: Sequence[np.ndarray]) -> float:
    """How far apart the feature sequences `[T_i, D]` of distinct captions are: the smallest, over pairs of
    equal length, of max |a - b| / max |a|; pairs of different length count as apart (their token counts
    differ, which the DiT sees through its text mask). 0 means two captions are indistinguishable."""
    by_length: dict[int, list[np.ndarray]] = {}
    for f in features:
        by_length.setdefault(len(f), []).append(f)
    smallest = np.inf
    for group in by_length.values():
        for a, b in itertools.combinations(group, 2):
            smallest = min(smallest, float(np.abs(a - b).max() / np.abs(a).max()))
    return smallest


@dataclasses.dataclass
class Components:
    """What `build_components` made: the modules it wrote, the VAE training history and the seconds spent."""

    folder: Path
    vae: AutoencoderKLFlux2
    text_encoder: mistral.MistralModel
    tokenizer: tokenizers.Tokenizer
    vae_history: list[dict[str, float]]
    seconds: float


def build_components(out_dir, *, shapes_config: shapes.ShapesConfig, vae_config: VAEConfig = SHAPES_VAE,
                     vae_training: autoencoder.AutoencoderTrainConfig = SHAPES_VAE_TRAINING,
                     batch_size: int = 8, stats_images: int = 512,
                     text_encoder_config: mistral.MistralConfig = SHAPES_TEXT_ENCODER,
                     transformer_config: ErnieImageConfig | None = None, scheduler_shift: float = 1.0,
                     seed: int = 0, progress: Callable[[str, dict], None] | None = None) -> Components:
    """Makes the frozen components and writes them with a random placeholder transformer as a pipeline
    folder at `out_dir` (which must not exist; it appears only when complete).

    The VAE trains for `vae_training.num_steps` steps on train-split batches of `batch_size` images, then
    its BatchNorm statistics are fitted on the next `stats_images` train images. The text encoder is
    `text_encoder_config` with the tokenizer's vocabulary size and random weights from `seed`. The
    placeholder transformer is `transformer_config` (default: the dit "tiny" preset with the encoder's
    width as `text_in_dim`). `scheduler_shift` is the folder's flow-matching shift (the released 4.0 suits
    4096 tokens; a 64-token latent needs little shifting). `progress(stage, info)` is called with
    ("vae", history entry) during training and ("stats" / "written", {...}) after.
    """
    start = time.perf_counter()
    report = progress or (lambda stage, info: None)
    vocabulary = shapes.prompt_vocabulary()
    tokenizer = caption_tokenizer(vocabulary)
    text_encoder_config = dataclasses.replace(text_encoder_config, vocab_size=tokenizer.get_vocab_size(),
                                              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if transformer_config is None:
        transformer_config = dataclasses.replace(DIT_PRESETS["tiny"], text_in_dim=text_encoder_config.hidden_size)
    if transformer_config.text_in_dim != text_encoder_config.hidden_size:
        raise ValueError(f"build_components: transformer text_in_dim {transformer_config.text_in_dim} != text "
                         f"encoder hidden_size {text_encoder_config.hidden_size}")
    if transformer_config.in_channels != vae_config.packed_channels:
        raise ValueError(f"build_components: transformer in_channels {transformer_config.in_channels} != the "
                         f"VAE's packed channels {vae_config.packed_channels}")
    if stats_images < 1 or batch_size < 1:
        raise ValueError(f"build_components: batch_size and stats_images must be >= 1, got {batch_size}, "
                         f"{stats_images}")
    if Path(out_dir).exists():
        raise FileExistsError(f"build_components: {out_dir} exists")

    vae = init_vae(vae_config, seed=seed)
    history = autoencoder.train_autoencoder(vae, image_batches(shapes_config, batch_size), vae_training,
                                            progress=lambda step, entry: report("vae", entry))
    stats_start = vae_training.num_steps * batch_size
    stats_batches = itertools.islice(image_batches(shapes_config, batch_size, start=stats_start),
                                     -(-stats_images // batch_size))
    mean, var = autoencoder.fit_latent_stats(vae, stats_batches)
    report("stats", {"mean_abs_max": float(np.abs(mean).max()), "var_min": float(var.min()),
                     "var_max": float(var.max())})

    text_encoder = mistral.init_model(text_encoder_config, seed=seed + 1)
    transformer = init_transformer(transformer_config, seed=seed + 2)
    with atomic_directory(out_dir) as staging:
        index = write_pipeline_components(staging, transformer, vae, text_encoder, shift=scheduler_shift)
        write_caption_tokenizer(staging / "tokenizer", vocabulary)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    seconds = time.perf_counter() - start
    report("written", {"folder": str(out_dir), "seconds": seconds})
    return Components(Path(out_dir), vae, text_encoder, tokenizer, history, seconds)
