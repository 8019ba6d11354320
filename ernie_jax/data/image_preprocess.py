"""The image preprocessing of transformers' CLIP and SigLIP image processors, from their preprocessor_config.json.

Mirrors the PIL backend of `CLIPImageProcessor` / `SiglipImageProcessor` (transformers 5 `*ImageProcessorPil`,
the "slow" processors): RGB conversion (transparency composited onto white), a PIL resize (shortest edge to
`size`, or to `height` x `width`) with the config's resampling filter, a centre crop, rescaling (x * 1/255 in
float64, rounded to float32) and per-channel normalisation in float32. Output: pixel values
`[B, 3, H, W]` float32, the layout and values of the processor's `pixel_values`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image

# Defaults of the processors' classes for keys a preprocessor_config.json leaves out (transformers 5.24:
# CLIPImageProcessorPil, SiglipImageProcessorPil); keyed by the processor name without a Fast/Pil suffix.
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": 224}, resample=Image.Resampling.BICUBIC,
        do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=_OPENAI_CLIP_MEAN, image_std=_OPENAI_CLIP_STD),
    "SiglipImageProcessor": dict(
        do_convert_rgb=True, do_resize=True, size={"height": 224, "width": 224}, resample=Image.Resampling.BICUBIC,
        do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
}
# Older folders name a feature extractor instead (openai/clip-vit-large-patch14: "CLIPFeatureExtractor").
_ALIASES = {"CLIPFeatureExtractor": "CLIPImageProcessor", "SiglipFeatureExtractor": "SiglipImageProcessor"}


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """One processor's settings. `shortest_edge` or (`height`, `width`) says the resize target; `crop` is the
    centre crop (height, width) or None; `mean` / `std` have one value per RGB channel."""

    do_convert_rgb: bool
    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    resample: int
    crop: tuple[int, int] | None
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> "ImagePreprocessor":
        """From a preprocessor_config.json dict; missing keys take the named processor's defaults. Raises
        ValueError naming the problem (unknown processor, bad size)."""
        name = values.get("image_processor_type") or values.get("feature_extractor_type")
        name = _ALIASES.get(name, name)
        for suffix in ("Fast", "Pil"):
            if isinstance(name, str) and name.endswith(suffix):
                name = name[: -len(suffix)]
        if name not in _PROCESSOR_DEFAULTS:
            raise ValueError(f"image processor {name!r} is not supported; expected one of {sorted(_PROCESSOR_DEFAULTS)}")
        merged = {**_PROCESSOR_DEFAULTS[name], **values}
        shortest_edge, resize_to = None, None
        if merged["do_resize"]:
            size = merged["size"]
            if isinstance(size, int):  # the processors' default_to_square=False: an int is the shortest edge
                size = {"shortest_edge": size}
            if isinstance(size, dict) and set(size) == {"shortest_edge"}:
                shortest_edge = _positive(size["shortest_edge"], "size.shortest_edge")
            elif isinstance(size, dict) and set(size) == {"height", "width"}:
                resize_to = (_positive(size["height"], "size.height"), _positive(size["width"], "size.width"))
            else:
                raise ValueError(f"size must be an int, {{shortest_edge}} or {{height, width}}, got {size!r}")
        crop = None
        if merged["do_center_crop"]:
            crop_size = merged["crop_size"]
            if isinstance(crop_size, int):  # an int crop is square
                crop_size = {"height": crop_size, "width": crop_size}
            if not isinstance(crop_size, dict) or set(crop_size) != {"height", "width"}:
                raise ValueError(f"crop_size must be an int or {{height, width}}, got {crop_size!r}")
            crop = (_positive(crop_size["height"], "crop_size.height"), _positive(crop_size["width"], "crop_size.width"))
        mean = std = None
        if merged["do_normalize"]:
            mean, std = tuple(float(v) for v in merged["image_mean"]), tuple(float(v) for v in merged["image_std"])
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ValueError(f"image_mean and image_std need 3 values (std positive), got {mean} and {std}")
        return cls(do_convert_rgb=bool(merged["do_convert_rgb"]), shortest_edge=shortest_edge, resize_to=resize_to,
                   resample=int(merged["resample"]), crop=crop,
                   rescale_factor=float(merged["rescale_factor"]) if merged["do_rescale"] else None, mean=mean, std=std)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_to is not None:
            return self.resize_to
        # transformers' get_resize_output_image_size: the long side is truncated, not rounded.
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, images: Sequence[Image.Image | np.ndarray] | np.ndarray) -> np.ndarray:
        """PIL images or uint8 arrays `[H, W, 3]` (or one uint8 array `[N, H, W, 3]`) -> `[N, 3, H', W']` float32."""
        return np.stack([self.one(image) for image in images])

    def one(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image -> `[3, H', W']` float32."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image arrays must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
        if self.do_convert_rgb:
            image = _to_rgb(image)
        if self.resize_to is not None or self.shortest_edge is not None:
            target_height, target_width = self._resized_size(image.height, image.width)
            image = image.resize((target_width, target_height), resample=self.resample)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        values = pixels.astype(np.float32)
        if self.rescale_factor is not None:
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.mean is not None:
            values = (values - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(values.transpose(2, 0, 1))


def _positive(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre `height` x `width` window of `[H, W, C]` (offsets rounded down, as transformers' center_crop)."""
    image_height, image_width = pixels.shape[:2]
    if height > image_height or width > image_width:
        raise ValueError(f"cannot centre-crop {height}x{width} from a {image_height}x{image_width} image "
                         f"(the processor pads; resize to at least the crop size)")
    top, left = (image_height - height) // 2, (image_width - width) // 2
    return pixels[top:top + height, left:left + width]
