"""Aspect-ratio buckets: the released ~1 MP sizes, their lower-resolution equivalents, assignment, crop.

A bucket is an image size `(height, width)` in pixels whose sides are multiples of 16 (the VAE's 8x
downsampling times the DiT's 2x2 patch). Every training batch holds images of one bucket.

Assignment picks the bucket whose aspect is closest in log space, so a portrait and the landscape
image with the inverse aspect are treated alike (NovelAI's bucketing uses the linear difference).
Images are then center-cropped to the bucket's aspect and resized to it; the fraction of the image
area that the crop removes is bounded by the caller (images above the bound are dropped, as NovelAI
drops extreme aspects).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

SIDE_MULTIPLE = 16

# The seven resolutions of the ERNIE-Image model card, as (height, width). The table holds both
# orientations of every aspect, so reading the card's "848x1264" as width x height or the reverse
# gives the same set.
RELEASED_1MP: tuple[tuple[int, int], ...] = (
    (1024, 1024), (848, 1264), (1264, 848), (768, 1376), (1376, 768), (896, 1200), (1200, 896))


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """An image size in pixels; both sides are positive multiples of `SIDE_MULTIPLE`."""

    height: int
    width: int

    def __post_init__(self):
        for name, side in (("height", self.height), ("width", self.width)):
            if not isinstance(side, (int, np.integer)) or side <= 0 or side % SIDE_MULTIPLE:
                raise ValueError(f"bucket {self.height}x{self.width}: {name} {side} is not a positive "
                                 f"multiple of {SIDE_MULTIPLE}")

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def area(self) -> int:
        return self.height * self.width


def as_buckets(sizes) -> tuple[Bucket, ...]:
    """`(height, width)` pairs (or Buckets) -> validated, duplicate-free Buckets in the given order."""
    buckets = tuple(dict.fromkeys(size if isinstance(size, Bucket) else Bucket(*map(int, size))
                                  for size in sizes))
    if not buckets:
        raise ValueError("a bucket set needs at least one bucket")
    return buckets


def stage_buckets(side: int, reference=RELEASED_1MP, area_tolerance: float = 0.05) -> tuple[Bucket, ...]:
    """The reference table's aspects at a pixel count of about `side`**2, sides multiples of 16.

    For each reference bucket, the size among multiples of 16 with area within `area_tolerance` of
    side**2 whose aspect is closest (in log space) to the reference aspect; ties go to the area
    closest to side**2. The released sizes have areas within 2.5% of 1024**2, so `side=1024`
    returns `RELEASED_1MP` itself.
    """
    if side <= 0 or side % SIDE_MULTIPLE:
        raise ValueError(f"stage side {side} is not a positive multiple of {SIDE_MULTIPLE}")
    target_area = float(side) ** 2
    heights = np.arange(SIDE_MULTIPLE, 4 * side + 1, SIDE_MULTIPLE)
    chosen = []
    for ref in as_buckets(reference):
        best = None
        for height in heights:
            ideal_width = height * ref.aspect
            for width in {int(np.floor(ideal_width / SIDE_MULTIPLE)) * SIDE_MULTIPLE,
                          int(np.ceil(ideal_width / SIDE_MULTIPLE)) * SIDE_MULTIPLE}:
                area_error = abs(height * width / target_area - 1.0)
                if width <= 0 or area_error > area_tolerance:
                    continue
                cost = (abs(np.log(width / height / ref.aspect)), area_error)
                if best is None or cost < best[0]:
                    best = (cost, Bucket(int(height), width))
        if best is None:
            raise ValueError(f"no {SIDE_MULTIPLE}-multiple size within {area_tolerance:.0%} of {side}^2 "
                             f"for aspect {ref.aspect:.3f}")
        chosen.append(best[1])
    return as_buckets(chosen)


def assign_buckets(heights, widths, buckets) -> np.ndarray:
    """Index of the bucket with the closest aspect (log space) for each image. int32 [N]."""
    image_log_aspect = np.log(np.asarray(widths, np.float64) / np.asarray(heights, np.float64))
    bucket_log_aspect = np.log(np.array([b.aspect for b in buckets], np.float64))
    return np.argmin(np.abs(image_log_aspect[:, None] - bucket_log_aspect[None, :]), axis=1).astype(np.int32)


def crop_fraction(heights, widths, bucket_heights, bucket_widths) -> np.ndarray:
    """Fraction of the image area the center crop to the bucket's aspect removes. float64 [N].

    1 - min(r, r_b) / max(r, r_b) for image aspect r and bucket aspect r_b.
    """
    image_aspect = np.asarray(widths, np.float64) / np.asarray(heights, np.float64)
    bucket_aspect = np.asarray(bucket_widths, np.float64) / np.asarray(bucket_heights, np.float64)
    return 1.0 - np.minimum(image_aspect, bucket_aspect) / np.maximum(image_aspect, bucket_aspect)


def center_crop_box(height: int, width: int, bucket: Bucket) -> tuple[float, float, float, float]:
    """(left, upper, right, lower) of the largest centered box with the bucket's aspect, in pixels."""
    if width / height > bucket.aspect:
        crop_width = height * bucket.aspect
        left = (width - crop_width) / 2
        return left, 0.0, left + crop_width, float(height)
    crop_height = width / bucket.aspect
    upper = (height - crop_height) / 2
    return 0.0, upper, float(width), upper + crop_height


def resize_and_crop(image: np.ndarray, bucket: Bucket) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [bucket.height, bucket.width, 3]: center crop to the aspect, then resize.

    The crop box is fractional, so the output is exactly the bucket's size with no rounding loss.
    Bicubic resampling; PIL widens the kernel when downscaling, which antialiases.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    box = center_crop_box(height, width, bucket)
    resized = Image.fromarray(image).resize((bucket.width, bucket.height), Image.Resampling.BICUBIC, box=box)
    return np.asarray(resized, np.uint8)
