"""The LAION improved aesthetic predictor as a scorer: CLIP ViT-L/14 preprocessing and image tower, the
L2-normalised projected embedding, then the MLP head (`ernie_jax.models.aesthetic_head`).

    scorer = LaionAestheticScorer.from_pretrained("clip-vit-large-patch14/", "sac+logos+ava1-l14-linearMSE.pth")
    scores = scorer(images)          # [N] float64, roughly the 1-10 rating scale

`images` are PIL images or uint8 arrays `[H, W, 3]` (or one `[N, H, W, 3]` array); the scorer is also a reward in
the sense of `ernie_jax.evaluation.rewards` (`scorer(images, prompts)`, prompts ignored).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ernie_jax.data.image_preprocess import ImagePreprocessor
from ernie_jax.models.aesthetic_head import AestheticHead, l2_normalize
from ernie_jax.models.vision_tower import VisionTower


class LaionAestheticScorer:
    """`images -> scores [N]`: `head(l2_normalize(tower(preprocess(images)).image_embeds))`, in batches of
    `batch_size` (the last one padded, so that one compiled program serves every call)."""

    def __init__(self, tower: VisionTower, head: AestheticHead, preprocess: ImagePreprocessor, *,
                 batch_size: int = 16):
        if tower.config.projection_dim != head.widths[0]:
            raise ValueError(f"the head reads {head.widths[0]}-d embeddings but the tower projects to "
                             f"{tower.config.projection_dim} (a CLIP tower with its visual_projection is needed)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tower, self.head, self.preprocess, self.batch_size = tower, head, preprocess, batch_size

    @classmethod
    def from_pretrained(cls, clip_folder, head_file, dtype="float32", **kwargs) -> "LaionAestheticScorer":
        """The tower and preprocessing of a transformers CLIP folder (`conversions.vision_tower`) and the head of
        a `.pth` or `.safetensors` file (`conversions.laion_aesthetic`)."""
        from conversions import laion_aesthetic, vision_tower

        return cls(vision_tower.load_vision_tower(clip_folder, dtype), laion_aesthetic.load_laion_head(head_file),
                   vision_tower.load_image_preprocessor(clip_folder), **kwargs)

    def _padded_batches(self, images):
        """(normalised embeddings `[batch_size, P]`, count of real images among them) per batch."""
        if len(images) == 0:
            raise ValueError("no images to score")
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start:start + self.batch_size])
            count = len(pixels)
            pixels = np.concatenate([pixels, np.zeros((self.batch_size - count, *pixels.shape[1:]), pixels.dtype)])
            yield l2_normalize(self.tower(pixels).image_embeds), count

    def embed(self, images: Sequence | np.ndarray) -> np.ndarray:
        """The L2-normalised CLIP image embeddings `[N, P]` float32."""
        return np.concatenate([np.asarray(embeds)[:count] for embeds, count in self._padded_batches(images)])

    def __call__(self, images: Sequence | np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        """Aesthetic scores `[N]` float64 of `images` (`prompts` is accepted for the reward interface and unused)."""
        scores = [np.asarray(self.head(embeds))[:count] for embeds, count in self._padded_batches(images)]
        return np.concatenate(scores).astype(np.float64)
