"""Automatic prompt-following evaluation for the synthetic shapes domain (`ernie_jax.data.shapes`).

Colour segmentation: every pixel is explained as the background mixed with one palette colour (shape
colours and the text colour): the colour whose background-to-colour line passes nearest to the pixel
wins, the mixing weight on that line is the pixel's coverage, and a pixel belongs to the colour when
its coverage is at least 1/2 and it lies within `max_colour_distance` of the line. Unmixing instead of
taking the nearest palette colour keeps anti-aliased and blurred edges with their own colour (half
yellow on dark grey is nearer to red than to yellow or the background).

`detect`: pixels of one shape colour form 4-connected components; components smaller than
`min_area_fraction` of a grid cell are dropped; a component's cell is the grid cell holding its
bounding-box centre. Its shape comes from the coverage of the component and its one-pixel rim, through
two features that blur and anti-aliasing barely move because they are built from sums of coverage:
asymmetry = minus the skewness of the row-coverage profile (0.566 for the apex-up triangle, whose rows
grow linearly, 0 for circle and square) picks triangles above half of 0.566; then box ratio = covered
area / (h' * w'), with h' = sum of row coverages / the largest row coverage and w' the same over
columns (1 for a square, 4/pi for a circle), picks circle above the midpoint of the two.

`read_word` finds the largest block of text-coloured pixels and correlates its coverage with each
word's font mask at the dataset's text scale. `score` compares what was read with a scene spec, or
with a styled prompt (`shapes.Prompt`) on the attributes the prompt names; `score_images` averages it
over images and `chance_levels` gives the same averages for images paired
with the wrong specs.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
from scipy import ndimage

from ernie_jax.data.shapes import (
    ATTRIBUTES,
    BACKGROUND,
    CELLS,
    GRID,
    PALETTE,
    TEXT_COLOUR,
    WORDS,
    Prompt,
    Scene,
    text_scale,
)
from ernie_jax.data.shapes_font import word_mask

METRICS = ("colour", "shape", "position", "count", "object", "all", "text")
_COLOURS = tuple(PALETTE)
_TEXT_LABEL = len(_COLOURS)
_BACKGROUND_LABEL = len(_COLOURS) + 1
_BACKGROUND = np.array(BACKGROUND, np.float32)
_DIRECTIONS = np.array([*PALETTE.values(), TEXT_COLOUR], np.float32) - _BACKGROUND  # [C + 1, 3]
# Skewness of the row profile of an apex-up triangle (density growing linearly downwards), negated.
_TRIANGLE_ASYMMETRY = 2 * math.sqrt(2) / 5


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """max_colour_distance: RGB distance from a background-to-colour line beyond which a pixel is no
    palette colour. min_area_fraction: smallest component kept, as a fraction of a grid cell's area (the
    smallest default shape, a triangle of size 0.6, covers 0.18 of a cell). min_word_correlation: the
    least correlation with a word's font mask for the word to be read."""

    max_colour_distance: float = 80.0
    min_area_fraction: float = 0.04
    min_word_correlation: float = 0.5


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    cell: str
    bbox: tuple[int, int, int, int]  # (top, left, bottom, right) in pixels, bottom and right exclusive
    area: int  # pixels

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.cell


def segment(image: np.ndarray, config: DetectorConfig = DetectorConfig()) -> tuple[np.ndarray, np.ndarray]:
    """(labels `[H, W]` int, coverage `[H, W, C + 1]` float32) of a uint8 RGB image `[H, W, 3]`. Label i <
    C = len(PALETTE) is the i-th palette colour, C the text colour, C + 1 background or no palette
    colour; coverage[..., i] is the pixel's mixing weight of colour i over the background, in [0, 1]."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    offset = image.astype(np.float32) - _BACKGROUND  # [H, W, 3]
    coverage = np.clip(offset @ _DIRECTIONS.T / (_DIRECTIONS**2).sum(axis=1), 0, 1)  # [H, W, C + 1]
    residual = ((offset[:, :, None, :] - coverage[..., None] * _DIRECTIONS) ** 2).sum(axis=-1)  # squared
    labels = residual.argmin(axis=-1)
    own_coverage = np.take_along_axis(coverage, labels[..., None], axis=-1)[..., 0]
    outside = (own_coverage < 0.5) | (residual.min(axis=-1) > config.max_colour_distance**2)
    labels[outside] = _BACKGROUND_LABEL
    return labels, coverage


def _cell(centre_y: float, centre_x: float, height: int, width: int) -> str:
    row = min(GRID - 1, int(centre_y * GRID / height))
    col = min(GRID - 1, int(centre_x * GRID / width))
    return CELLS[row * GRID + col]


def classify_shape(coverage: np.ndarray) -> str:
    """"triangle", "circle" or "square" from the coverage `[h, w]` of one component cropped to its
    bounding box plus a one-pixel rim (see the module docstring for the two features)."""
    rows = coverage.sum(axis=1)
    cols = coverage.sum(axis=0)
    weights = rows / rows.sum()
    y = np.arange(len(rows))
    mean = (weights * y).sum()
    spread = math.sqrt((weights * (y - mean) ** 2).sum())
    asymmetry = -(weights * (y - mean) ** 3).sum() / max(spread, 1e-6) ** 3
    if asymmetry > _TRIANGLE_ASYMMETRY / 2:
        return "triangle"
    box_ratio = coverage.sum() / ((rows.sum() / rows.max()) * (cols.sum() / cols.max()))
    return "circle" if box_ratio > (1 + 4 / math.pi) / 2 else "square"


def detect(image: np.ndarray, config: DetectorConfig = DetectorConfig()) -> list[DetectedObject]:
    """The shapes in a uint8 RGB image `[H, W, 3]`, largest first (text-coloured pixels are not shapes)."""
    return objects_in(*segment(image, config), config)


def objects_in(labels: np.ndarray, coverage: np.ndarray, config: DetectorConfig = DetectorConfig()
               ) -> list[DetectedObject]:
    """`detect`'s shapes from a segmentation already made (`segment(image, config)`)."""
    height, width = labels.shape
    min_area = config.min_area_fraction * (height / GRID) * (width / GRID)
    # A one-pixel frame of background gives every component a full rim; boxes below are in framed pixels.
    labels = np.pad(labels, 1, constant_values=_BACKGROUND_LABEL)
    coverage = np.pad(coverage, ((1, 1), (1, 1), (0, 0)))
    found = []
    for index, colour in enumerate(_COLOURS):
        components, _ = ndimage.label(labels == index)
        for number, box in enumerate(ndimage.find_objects(components), start=1):
            area = int((components[box] == number).sum())
            if area < min_area:
                continue
            top, bottom, left, right = box[0].start, box[0].stop, box[1].start, box[1].stop
            rim = (slice(top - 1, bottom + 1), slice(left - 1, right + 1))
            grown = ndimage.binary_dilation(components[rim] == number)
            own = grown & np.isin(labels[rim], (index, _BACKGROUND_LABEL))
            shape = classify_shape(np.where(own, coverage[rim][..., index], 0))
            bbox = (top - 1, left - 1, bottom - 1, right - 1)
            cell = _cell((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2, height, width)
            found.append(DetectedObject(colour, shape, cell, bbox, area))
    return sorted(found, key=lambda o: -o.area)


def read_word(image: np.ndarray, config: DetectorConfig = DetectorConfig()) -> str | None:
    """The dataset word whose font mask (at the dataset's text scale for this image size) correlates best
    with the text coverage around the largest block of text-coloured pixels, within one font pixel of
    the block's centre; None without text pixels or when no word reaches `min_word_correlation`. Letters
    are joined into one block across gaps up to a tenth of the image width."""
    return _word(*segment(image, config), config)


def _word(labels: np.ndarray, coverage: np.ndarray, config: DetectorConfig) -> str | None:
    text = labels == _TEXT_LABEL
    height, width = text.shape
    if text.sum() < config.min_area_fraction * (height / GRID) * (width / GRID):
        return None
    reach = max(1, width // 20)
    components, count = ndimage.label(ndimage.binary_dilation(text, structure=np.ones((1, 2 * reach + 1), bool)))
    sizes = ndimage.sum(text, components, index=np.arange(1, count + 1))
    block = ndimage.find_objects((text & (components == 1 + int(np.argmax(sizes)))).astype(np.int32))[0]
    centre_y, centre_x = (block[0].start + block[0].stop) / 2, (block[1].start + block[1].stop) / 2
    scale = text_scale(height, width)
    best_word, best_correlation = None, config.min_word_correlation
    for word in WORDS:
        template = word_mask(word, scale).astype(np.float32)
        template -= template.mean()
        th, tw = template.shape
        # Every placement of the template within `scale` pixels of the block's centre, zeros off the image.
        padded = np.pad(coverage[..., _TEXT_LABEL], ((th + scale, th + scale), (tw + scale, tw + scale)))
        top = math.floor(centre_y - th / 2 + 0.5) + th
        left = math.floor(centre_x - tw / 2 + 0.5) + tw
        region = padded[top:top + th + 2 * scale, left:left + tw + 2 * scale]
        windows = np.lib.stride_tricks.sliding_window_view(region, (th, tw))  # [2s + 1, 2s + 1, th, tw]
        windows = windows - windows.mean(axis=(-2, -1), keepdims=True)
        norms = np.sqrt((windows**2).sum(axis=(-2, -1))) * np.linalg.norm(template)
        correlation = (windows * template).sum(axis=(-2, -1)) / np.maximum(norms, 1e-6)
        if correlation.max() >= best_correlation:
            best_word, best_correlation = word, float(correlation.max())
    return best_word


def _matched_fraction(wanted: list, found: list) -> float:
    return sum((collections.Counter(wanted) & collections.Counter(found)).values()) / len(wanted)


_ATTRIBUTE_FIELDS = {"colour": "colour", "shape": "shape", "position": "cell"}


def score(spec: Prompt | Scene | str, image: np.ndarray, config: DetectorConfig = DetectorConfig()
          ) -> dict[str, float]:
    """How well `image` follows `spec`: a scene (a Scene or its JSON: every attribute is asked for) or a
    styled prompt (a `shapes.Prompt`: only its `attributes` of each object are). With P the prompted
    objects and D the detected ones, both as multisets, and an object's key its asked attributes:
      colour    |colours(P) & colours(D)| / |P|: fraction of prompted objects whose colour is found
      shape     the same with shapes
      position  the same with cells
      object    the same with keys ((colour, shape, cell) for a scene): fraction of prompted objects found
      count     1 if |D| == |P| else 0
      text      1 if the prompted word is read back (`read_word`), else 0
      all       1 if keys(D) == keys(P) and, when a word is prompted, it is read back; else 0
    colour, shape, position and object are NaN when no object is prompted, colour, shape and position
    also when the prompt does not name them, and text when no word is prompted."""
    if isinstance(spec, Prompt):
        scene, attributes = spec.scene, spec.attributes
    else:
        scene, attributes = Scene.from_json(spec) if isinstance(spec, str) else spec, ATTRIBUTES
    labels, coverage = segment(image, config)
    found = objects_in(labels, coverage, config)
    wanted = scene.objects
    fields = [_ATTRIBUTE_FIELDS[a] for a in attributes]

    def keys(objects) -> list[tuple[str, ...]]:
        return [tuple(getattr(o, field) for field in fields) for o in objects]

    result = dict.fromkeys(METRICS, math.nan)
    if wanted:
        for attribute in attributes:
            field = _ATTRIBUTE_FIELDS[attribute]
            result[attribute] = _matched_fraction([getattr(o, field) for o in wanted],
                                                  [getattr(o, field) for o in found])
        result["object"] = _matched_fraction(keys(wanted), keys(found))
    result["count"] = float(len(found) == len(wanted))
    word_ok = True
    if scene.word is not None:
        word_ok = _word(labels, coverage, config) == scene.word.text
        result["text"] = float(word_ok)
    result["all"] = float(collections.Counter(keys(wanted)) == collections.Counter(keys(found)) and word_ok)
    return result


def score_images(specs, images, config: DetectorConfig = DetectorConfig()) -> dict[str, float]:
    """Each metric of `score` averaged over the (spec, image) pairs where it is defined (NaN if nowhere).
    specs: Scenes, their JSON strings or `shapes.Prompt`s; images: uint8 `[N, H, W, 3]` or a sequence of `[H, W, 3]`."""
    if len(specs) != len(images):
        raise ValueError(f"score_images: {len(specs)} specs for {len(images)} images")
    if not len(specs):
        raise ValueError("score_images: no images")
    table = np.array([[s[m] for m in METRICS] for s in (score(p, i, config) for p, i in zip(specs, images))])
    defined = ~np.isnan(table)
    sums = np.where(defined, table, 0).sum(axis=0)
    counts = defined.sum(axis=0)
    return {m: float(sums[k] / counts[k]) if counts[k] else math.nan for k, m in enumerate(METRICS)}


def chance_levels(specs, images, seed: int = 0, config: DetectorConfig = DetectorConfig()) -> dict[str, float]:
    """`score_images` with every image paired with another image's spec: what an image generator that
    ignores its prompt but draws from the same distribution would score. The pairing is a random
    permutation shifted by one, so no image keeps its own spec (needs at least two images)."""
    if len(specs) < 2:
        raise ValueError("chance_levels: needs at least two (spec, image) pairs")
    order = np.random.default_rng(seed).permutation(len(specs))
    shuffled_specs = [specs[i] for i in np.roll(order, 1)]
    return score_images(shuffled_specs, [images[i] for i in order], config)
