"""A synthetic aesthetic domain for the aesthetic scorer's toy proof (issue 15; training_algorithms.md
section 4 and experiment F, on images): shapes scenes drawn by `shapes.render` whose quality is known by
construction, in scene types (categories) whose quality distributions differ.

Four factors, each in [0, 1], are read off the scene itself (`factors`):

    symmetry   the fraction of objects with a mirror twin across the vertical axis: an object of the same
               colour, shape and size in the mirrored cell with the mirrored offset (dy, -dx). An object in the
               centre column with dx = 0 is its own twin.
    harmony    1 - (distinct object colours - 1) / (len(PALETTE) - 1): one colour 1, all four 0.
    clutter    specks / MAX_SPECKS: small squares scattered over the background.
    roughness  the amplitude of the noise on the shapes' edges, as a fraction of MAX_EDGE_NOISE (edge
               cleanliness is 1 - roughness).

    quality = 1 + 9 * (0.35 * symmetry + 0.25 * harmony + 0.2 * (1 - clutter) + 0.2 * (1 - roughness))

so quality is in [1, 10], 10 exactly for a symmetric one-colour scene without specks and with clean edges, and
rises with symmetry and harmony and falls with clutter and roughness (`FACTOR_WEIGHTS`).

Categories, each a scene type with its own generator (`CATEGORY_KNOBS`: how often the layout is built
symmetric, the range of distinct colours, of specks and of roughness):

    "emblem"   1-3 objects stacked on the centre column; the asymmetric variant moves one of them aside
    "pattern"  1-2 mirrored pairs (and a centre object with one pair); the asymmetric variant changes the
               shape of one pair's right twin
    "collage"  2-4 objects of free shape and size in random cells, more colours, specks and roughness; an
               object landing in the centre column is its own twin, other twins need equal sizes and happen
               only by chance

With the default knobs (300 scenes, seed 0) the mean quality is about 8.4 (emblem), 7.8 (pattern) and 4.8
(collage), each with a standard deviation of about 1.

Rendering: `shapes.render` of the objects on its dark background, then the specks (squares of side
`speck_side(height, width)` in palette colours, at their unit-square positions), then integer noise uniform in
[-a, a], a = round(roughness * MAX_EDGE_NOISE), on the edge band: the pixels of the clean objects' image
that differ from one of their 4 neighbours. The noise is drawn from the scene's `noise_seed`, so an image is a
pure function of (scene, height, width) and `render_scenes` a pure function of its arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from ernie_jax.data import shapes
from ernie_jax.data.shapes import CELLS, GRID, PALETTE, SHAPES, ShapeObject

FACTORS = ("symmetry", "harmony", "clutter", "roughness")
# Quality = 1 + 9 * sum of weight * term, the term being the factor, or 1 - the factor where the factor hurts.
FACTOR_WEIGHTS = {"symmetry": 0.35, "harmony": 0.25, "clutter": 0.2, "roughness": 0.2}
HURTING_FACTORS = ("clutter", "roughness")
MAX_SPECKS = 12
MAX_EDGE_NOISE = 96
SIZE_RANGE = (0.5, 0.7)
CATEGORIES = ("emblem", "pattern", "collage")
# symmetric: probability that the layout is built symmetric; colours, specks: inclusive integer ranges;
# roughness: a uniform range.
CATEGORY_KNOBS = {
    "emblem": {"symmetric": 0.8, "colours": (1, 2), "specks": (0, 4), "roughness": (0.0, 0.5)},
    "pattern": {"symmetric": 0.6, "colours": (1, 3), "specks": (0, 6), "roughness": (0.0, 0.7)},
    "collage": {"symmetric": 0.0, "colours": (2, 4), "specks": (2, 10), "roughness": (0.2, 1.0)},
}


@dataclasses.dataclass(frozen=True)
class Speck:
    """A small square centred at (y, x), in fractions of the image's height and width."""

    y: float
    x: float
    colour: str

    def __post_init__(self):
        if not (0 <= self.y <= 1 and 0 <= self.x <= 1) or self.colour not in PALETTE:
            raise ValueError(f"{self}: needs y and x in [0, 1] and a colour of {tuple(PALETTE)}")


@dataclasses.dataclass(frozen=True)
class AestheticScene:
    """A scene of the domain: its objects (distinct cells), specks, edge roughness in [0, 1] and the seed of its
    edge noise."""

    category: str
    objects: tuple[ShapeObject, ...]
    specks: tuple[Speck, ...] = ()
    roughness: float = 0.0
    noise_seed: int = 0

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; expected one of {CATEGORIES}")
        if not self.objects:
            raise ValueError("an aesthetic scene needs at least one object")
        if len(self.specks) > MAX_SPECKS:
            raise ValueError(f"{len(self.specks)} specks; at most {MAX_SPECKS}")
        if not 0.0 <= self.roughness <= 1.0:
            raise ValueError(f"roughness {self.roughness} is not in [0, 1]")
        shapes.Scene("shapes", self.objects)  # checks that no two objects share a cell

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _mirror(obj: ShapeObject) -> ShapeObject:
    row, col = divmod(CELLS.index(obj.cell), GRID)
    return ShapeObject(obj.colour, obj.shape, CELLS[row * GRID + GRID - 1 - col], obj.size,
                       (obj.offset[0], -obj.offset[1]))


def factors(scene: AestheticScene) -> dict[str, float]:
    """The scene's four factors (module docstring), each in [0, 1]."""
    objects = set(scene.objects)
    twins = sum(_mirror(obj) in objects for obj in scene.objects)
    colours = len({obj.colour for obj in scene.objects})
    return {"symmetry": twins / len(scene.objects), "harmony": 1 - (colours - 1) / (len(PALETTE) - 1),
            "clutter": len(scene.specks) / MAX_SPECKS, "roughness": scene.roughness}


def quality(scene: AestheticScene) -> float:
    """The scene's true aesthetic quality in [1, 10] (module docstring)."""
    values = factors(scene)
    terms = {name: 1 - value if name in HURTING_FACTORS else value for name, value in values.items()}
    return 1 + 9 * sum(FACTOR_WEIGHTS[name] * terms[name] for name in FACTORS)


def _size(rng: np.random.Generator) -> float:
    return round(float(rng.uniform(*SIZE_RANGE)), 4)


def _emblem(rng: np.random.Generator, symmetric: bool) -> list[tuple[str, str, float, int]]:
    """(shape, cell, size, colour group) of each object of an emblem: 1-3 objects on the centre column, one of
    them moved to a side column in the same row when not symmetric."""
    rows = np.sort(rng.choice(GRID, int(rng.integers(1, GRID + 1)), replace=False))
    columns = [GRID // 2] * len(rows)
    if not symmetric:
        columns[int(rng.integers(len(rows)))] = int(rng.choice([0, GRID - 1]))
    return [(SHAPES[int(rng.integers(len(SHAPES)))], CELLS[row * GRID + column], _size(rng), group)
            for group, (row, column) in enumerate(zip(rows.tolist(), columns, strict=True))]


def _pattern(rng: np.random.Generator, symmetric: bool) -> list[tuple[str, str, float, int]]:
    """1-2 rows each holding a mirrored pair in its side columns (a pair shares shape, size and colour group),
    plus an object in the centre column of another row when there is one pair; when not symmetric, the right
    twin of one pair gets another shape."""
    pairs = int(rng.integers(1, 3))
    rows = rng.choice(GRID, pairs + (pairs == 1), replace=False).tolist()
    specs = []
    for group, row in enumerate(rows[:pairs]):
        shape, size = SHAPES[int(rng.integers(len(SHAPES)))], _size(rng)
        specs += [(shape, CELLS[row * GRID], size, group), (shape, CELLS[row * GRID + GRID - 1], size, group)]
    if pairs == 1:
        specs.append((SHAPES[int(rng.integers(len(SHAPES)))], CELLS[rows[1] * GRID + GRID // 2], _size(rng), pairs))
    if not symmetric:
        broken = 2 * int(rng.integers(pairs)) + 1
        shape, cell, size, group = specs[broken]
        other_shapes = [other for other in SHAPES if other != shape]
        specs[broken] = (other_shapes[int(rng.integers(len(other_shapes)))], cell, size, group)
    return specs


def _collage(rng: np.random.Generator, symmetric: bool) -> list[tuple[str, str, float, int]]:
    """2-4 objects in random cells, each its own colour group (`symmetric` is not used)."""
    cells = rng.choice(len(CELLS), int(rng.integers(2, 5)), replace=False).tolist()
    return [(SHAPES[int(rng.integers(len(SHAPES)))], CELLS[cell], _size(rng), group)
            for group, cell in enumerate(cells)]


LAYOUTS = {"emblem": _emblem, "pattern": _pattern, "collage": _collage}


def sample_scene(rng: np.random.Generator, category: str) -> AestheticScene:
    """A random scene of `category`, its knobs drawn from `CATEGORY_KNOBS[category]`."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    knobs = CATEGORY_KNOBS[category]
    specs = LAYOUTS[category](rng, bool(rng.random() < knobs["symmetric"]))
    groups = max(group for *_, group in specs) + 1
    # Each of the `wanted` colours is used by at least one colour group (twins share their group's colour).
    wanted = min(int(rng.integers(knobs["colours"][0], knobs["colours"][1] + 1)), groups)
    palette = [list(PALETTE)[i] for i in rng.choice(len(PALETTE), wanted, replace=False)]
    group_colours = palette + [palette[i] for i in rng.integers(wanted, size=groups - wanted)]
    group_colours = [group_colours[i] for i in rng.permutation(groups)]
    objects = tuple(ShapeObject(group_colours[group], shape, cell, size) for shape, cell, size, group in specs)
    specks = tuple(Speck(round(float(rng.uniform(0.02, 0.98)), 4), round(float(rng.uniform(0.02, 0.98)), 4),
                         list(PALETTE)[int(rng.integers(len(PALETTE)))])
                   for _ in range(int(rng.integers(knobs["specks"][0], knobs["specks"][1] + 1))))
    roughness = round(float(rng.uniform(*knobs["roughness"])), 4)
    return AestheticScene(category, objects, specks, roughness, int(rng.integers(2**31)))


def speck_side(height: int, width: int) -> int:
    """A speck's side in pixels: 1 up to 63 px on the shorter side, 2 at 64 px, 4 at 128 px."""
    return max(1, min(height, width) // 32)


def edge_band(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the pixels of `image` [H, W, 3] that differ from one of their 4 neighbours."""
    band = np.zeros(image.shape[:2], bool)
    vertical = np.any(image[1:] != image[:-1], axis=-1)
    horizontal = np.any(image[:, 1:] != image[:, :-1], axis=-1)
    band[1:] |= vertical
    band[:-1] |= vertical
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    return band


def render(scene: AestheticScene, height: int, width: int) -> np.ndarray:
    """The scene as uint8 RGB `[height, width, 3]` (module docstring)."""
    clean = shapes.render(shapes.Scene("shapes", scene.objects), height, width)
    image = clean.copy()
    side = speck_side(height, width)
    for speck in scene.specks:
        top = int(np.clip(np.floor(speck.y * height - side / 2 + 0.5), 0, height - side))
        left = int(np.clip(np.floor(speck.x * width - side / 2 + 0.5), 0, width - side))
        image[top:top + side, left:left + side] = PALETTE[speck.colour]
    amplitude = round(scene.roughness * MAX_EDGE_NOISE)
    if amplitude:
        band = edge_band(clean)
        noise = np.random.default_rng(scene.noise_seed).integers(-amplitude, amplitude + 1, (int(band.sum()), 3))
        image[band] = np.clip(image[band].astype(np.int64) + noise, 0, 255).astype(np.uint8)
    return image


@dataclasses.dataclass(frozen=True)
class AestheticSet:
    """N rendered scenes: images uint8 [N, H, W, 3], quality float64 [N] (true, in [1, 10]), categories str [N],
    factors: name -> float64 [N], scenes: the specs."""

    images: np.ndarray
    quality: np.ndarray
    categories: np.ndarray
    factors: dict[str, np.ndarray]
    scenes: tuple[AestheticScene, ...]


def render_scenes(num: int, seed: int, height: int = 64, width: int = 64,
                  category_weights: dict[str, float] | None = None) -> AestheticSet:
    """`num` scenes, scene i of category drawn by `category_weights` (default: equal) from a generator seeded
    by (seed, i), so any prefix of a larger set is the same scenes."""
    weights = dict.fromkeys(CATEGORIES, 1.0) if category_weights is None else dict(category_weights)
    unknown = sorted(set(weights) - set(CATEGORIES))
    probs = np.array([weights.get(name, 0.0) for name in CATEGORIES], np.float64)
    if unknown or num < 1 or (probs < 0).any() or not probs.sum() > 0:
        raise ValueError(f"render_scenes: need num >= 1 and non-negative weights of {CATEGORIES} with a positive "
                         f"sum; got num={num}, category_weights={category_weights}")
    scenes = []
    for index in range(num):
        rng = np.random.default_rng((seed, index))
        scenes.append(sample_scene(rng, CATEGORIES[int(rng.choice(len(CATEGORIES), p=probs / probs.sum()))]))
    values = [factors(scene) for scene in scenes]
    return AestheticSet(images=np.stack([render(scene, height, width) for scene in scenes]),
                        quality=np.array([quality(scene) for scene in scenes], np.float64),
                        categories=np.array([scene.category for scene in scenes], dtype=str),
                        factors={name: np.array([v[name] for v in values], np.float64) for name in FACTORS},
                        scenes=tuple(scenes))


def write_image_folder(folder: str | os.PathLike, scenes: AestheticSet) -> Path:
    """The scenes as an image folder `sources.FolderSource` reads (written atomically): NNNNNN.png, its caption
    (`shapes.caption` of the objects) in NNNNNN.txt and NNNNNN.json {"category", "quality", "factors",
    "spec"}. The true quality is not stored as `aesthetic`: a scoring job (`aesthetics.score_data`) gives that."""
    from PIL import Image

    from conversions.common import atomic_directory

    with atomic_directory(folder) as staging:
        for index, scene in enumerate(scenes.scenes):
            stem = staging / f"{index:06d}"
            Image.fromarray(scenes.images[index]).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(shapes.caption(shapes.Scene("shapes", scene.objects)), "utf-8")
            metadata = {"category": scene.category, "quality": float(scenes.quality[index]),
                        "factors": {name: float(scenes.factors[name][index]) for name in FACTORS},
                        "spec": scene.to_json()}
            stem.with_suffix(".json").write_text(json.dumps(metadata, sort_keys=True), "utf-8")
    return Path(folder)
