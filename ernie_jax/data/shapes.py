"""The bundled synthetic dataset: coloured shapes on a 3x3 grid, some scenes with a rendered word.

A scene (`Scene`) is a resolution-independent spec: objects with a colour, a shape, a grid cell, a size
and a small offset inside the cell, and optionally a word in capitals centred in one grid row. A
grammar turns a scene into its caption ("a red circle at the top left and a blue square at the bottom
right", 'two green triangles at the top and the center', 'the word "SUN" at the bottom and a yellow
square at the top right') and `parse_caption` turns a caption back into a scene. Captions use the
closed vocabulary `vocabulary()`, from which a word-level tokenizer can be built.

`styled_prompt` rewrites a scene into the prompt styles of `prompt_styles.STYLES` (ERNIE-Image's SFT
caption diversification): the short styles name only some attributes of the objects, the long ones all
of them in another form; a `Prompt` records which attributes its text asks for, so that the detector
scores only those. Prompts use `prompt_vocabulary()`: the caption vocabulary and `PROMPT_WORDS`.

Every record is a pure function of (config, split, index): `make_example` seeds a generator from the
three, so any record can be made on its own, on any host, with the same bytes. The colour-shape-cell
combinations in `heldout_triples()` never occur in the "train" split; every "heldout" scene has at least
one of them, so held-out prompts test compositions that no training caption contains.

Record (the dict `make_example` returns and the tfds builder stores):
  image      uint8 [H, W, 3], RGB, no encoding (the tfds builder zlib-compresses it)
  caption    str
  category   str, one of CATEGORIES: "shapes" (1..max_objects objects of distinct colour-shape pairs),
             "counting" (2..max_objects objects of one colour and shape), "text" (a word and 0 or 1 object)
  aesthetic  float in [1, 10], a deterministic function of the layout (see `aesthetic`)
  spec       str, the scene as JSON (`Scene.to_json`, read back with `Scene.from_json`)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re

import numpy as np

from ernie_jax.data.shapes_font import word_mask, word_size

# Colours far apart in RGB (nearest pair, red-yellow, is 161 apart) on a dark neutral background, so
# nearest-palette segmentation separates them even in blurry generated images.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (40, 185, 75),
    "blue": (55, 105, 245),
    "yellow": (240, 205, 40),
}
TEXT_COLOUR = (240, 240, 240)
BACKGROUND = (24, 24, 32)
SHAPES = ("circle", "square", "triangle")
# Row-major 3x3 grid; the middle row and column are named by their other coordinate only.
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
GRID = 3
WORD_CELLS = ("top", "center", "bottom")  # a word is centred horizontally in one row
WORDS = ("CAT", "DOG", "SUN", "BOX", "ART", "SKY")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
CATEGORIES = ("shapes", "counting", "text")
SPLITS = ("train", "heldout")
MIN_SIDE = 32
DEFAULT_SIZE = 0.65
# Gap kept between an object and its cell's border, in cells, so objects in neighbouring cells never touch.
CELL_MARGIN = 0.05
SUPERSAMPLING = 4  # per axis: shape edges are anti-aliased by averaging 4x4 point samples per pixel

# What a prompt can say about each object (the scene's word is always named).
ATTRIBUTES = ("colour", "shape", "position")
# The attribute sets of the short styles: every non-empty proper subset of ATTRIBUTES.
SHORT_ATTRIBUTE_SETS = tuple(subset for size in (1, 2) for subset in itertools.combinations(ATTRIBUTES, size))
# Words styled prompts use beyond the captions': "shape(s)" stands for an unnamed shape, "draw" leads
# the instruction style.
PROMPT_WORDS = ("draw", "shape", "shapes")
_CAPTION_TOKEN = re.compile(r'[A-Za-z]+|[",]')
_COUNTS = {word: n for n, word in NUMBER_WORDS.items()}


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What the synthetic dataset looks like.

    height, width: image size in pixels (>= 32 each; need not be equal).
    seed: every record is generated from (seed, split, index).
    max_objects: most shapes in one scene, 1..4.
    category_weights: sampling probabilities of CATEGORIES ("shapes", "counting", "text"), normalised.
    size_range: an object's side (bounding box) as a fraction of its cell's shorter side.
    """

    height: int = 64
    width: int = 64
    seed: int = 0
    max_objects: int = 2
    category_weights: tuple[float, float, float] = (0.6, 0.2, 0.2)
    size_range: tuple[float, float] = (0.6, 0.8)

    def __post_init__(self):
        if self.height < MIN_SIDE or self.width < MIN_SIDE:
            raise ValueError(f"ShapesConfig: height and width must be >= {MIN_SIDE}, got {self.height}x{self.width}")
        if not 1 <= self.max_objects <= max(NUMBER_WORDS):
            raise ValueError(f"ShapesConfig: max_objects must be in 1..{max(NUMBER_WORDS)}, got {self.max_objects}")
        weights = np.asarray(self.category_weights, np.float64)
        if weights.shape != (len(CATEGORIES),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"ShapesConfig: category_weights must be {len(CATEGORIES)} non-negative numbers "
                             f"(for {CATEGORIES}) with a positive sum, got {self.category_weights}")
        if self.max_objects < 2 and weights[CATEGORIES.index("counting")] > 0:
            raise ValueError("ShapesConfig: the 'counting' category needs max_objects >= 2; set its weight to 0")
        low, high = self.size_range
        if not 0.2 <= low <= high <= 1 - 2 * CELL_MARGIN:
            raise ValueError(f"ShapesConfig: size_range must satisfy 0.2 <= low <= high <= {1 - 2 * CELL_MARGIN}, "
                             f"got {self.size_range}")
        word_height, word_width = word_size(max(WORDS, key=len), text_scale(self.height, self.width))
        if word_width > self.width or word_height > self.height / GRID:
            raise ValueError(f"ShapesConfig: a {word_height}x{word_width} word does not fit a "
                             f"{self.height}x{self.width} image")


def text_scale(height: int, width: int) -> int:
    """Pixels per font pixel: 1 up to 63 px on the shorter side, 2 at 64 px, 4 at 128 px."""
    return max(1, min(height, width) // MIN_SIDE)


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One shape. size: bounding-box side / the cell's shorter side; offset: (dy, dx) of its centre from
    the cell's centre, in cell heights and cell widths."""

    colour: str
    shape: str
    cell: str
    size: float = DEFAULT_SIZE
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        _check_choice("colour", self.colour, PALETTE)
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("cell", self.cell, CELLS)
        reach = self.size / 2 + max(abs(self.offset[0]), abs(self.offset[1]))
        if self.size <= 0 or reach > 0.5:
            raise ValueError(f"ShapeObject: size {self.size} with offset {self.offset} leaves cell {self.cell!r}")

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.cell


@dataclasses.dataclass(frozen=True)
class Word:
    """A word in capitals, centred horizontally in the row of `cell` ("top", "center" or "bottom")."""

    text: str
    cell: str

    def __post_init__(self):
        _check_choice("word", self.text, WORDS)
        _check_choice("word cell", self.cell, WORD_CELLS)


@dataclasses.dataclass(frozen=True)
class Scene:
    category: str
    objects: tuple[ShapeObject, ...]
    word: Word | None = None

    def __post_init__(self):
        _check_choice("category", self.category, CATEGORIES)
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Scene: two objects share a cell: {cells}")
        if self.word is not None and any(_row(c) == _row(self.word.cell) for c in cells):
            raise ValueError(f"Scene: an object shares the row of the word at {self.word.cell!r}: {cells}")

    def without_placement(self) -> Scene:
        """The scene as its caption describes it: default size, no offsets."""
        objects = tuple(ShapeObject(o.colour, o.shape, o.cell) for o in self.objects)
        return dataclasses.replace(self, objects=objects)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Scene:
        try:
            raw = json.loads(text)
            objects = tuple(ShapeObject(o["colour"], o["shape"], o["cell"], o["size"], tuple(o["offset"]))
                            for o in raw["objects"])
            word = None if raw["word"] is None else Word(raw["word"]["text"], raw["word"]["cell"])
            return cls(raw["category"], objects, word)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"Scene.from_json: not a scene spec ({err}): {text[:200]!r}") from None


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(choices)}")


def _row(cell: str) -> int:
    return CELLS.index(cell) // GRID


def heldout_triples() -> frozenset[tuple[str, str, str]]:
    """The (colour, shape, cell) combinations kept out of the training split: one cell per colour-shape
    pair, stepping through the grid (stride 4, coprime with 9) so every cell and every colour and shape
    still appears in training in its other combinations."""
    pairs = itertools.product(PALETTE, SHAPES)
    return frozenset((colour, shape, CELLS[(4 * k) % len(CELLS)]) for k, (colour, shape) in enumerate(pairs))


def scene_rng(config: ShapesConfig, split: str, index: int) -> np.random.Generator:
    """The generator of record `index` of `split`: independent of every other record."""
    _check_choice("split", split, SPLITS)
    if index < 0:
        raise ValueError(f"scene_rng: index must be >= 0, got {index}")
    return np.random.default_rng((config.seed, SPLITS.index(split), index))


def sample_scene(rng: np.random.Generator, config: ShapesConfig, split: str) -> Scene:
    """A random scene of `split`: "train" scenes contain no held-out triple, "heldout" scenes contain one
    or more (rejection sampling from the same distribution)."""
    _check_choice("split", split, SPLITS)
    heldout = heldout_triples()
    weights = np.asarray(config.category_weights, np.float64)
    while True:
        scene = _sample_any_scene(rng, config, CATEGORIES[rng.choice(len(CATEGORIES), p=weights / weights.sum())])
        has_heldout = any(o.triple in heldout for o in scene.objects)
        if has_heldout == (split == "heldout"):
            return scene


def _sample_any_scene(rng: np.random.Generator, config: ShapesConfig, category: str) -> Scene:
    pairs = list(itertools.product(PALETTE, SHAPES))
    word = None
    if category == "shapes":
        count = int(rng.integers(1, config.max_objects + 1))
        cells = [CELLS[i] for i in rng.choice(len(CELLS), count, replace=False)]
        chosen = [pairs[i] for i in rng.choice(len(pairs), count, replace=False)]
    elif category == "counting":
        count = int(rng.integers(2, config.max_objects + 1))
        cells = [CELLS[i] for i in np.sort(rng.choice(len(CELLS), count, replace=False))]
        chosen = [pairs[int(rng.integers(len(pairs)))]] * count
    else:
        word = Word(WORDS[int(rng.integers(len(WORDS)))], WORD_CELLS[int(rng.integers(len(WORD_CELLS)))])
        free = [c for c in CELLS if _row(c) != _row(word.cell)]
        count = int(rng.integers(0, 2))
        cells = [free[i] for i in rng.choice(len(free), count, replace=False)]
        chosen = [pairs[i] for i in rng.choice(len(pairs), count, replace=False)]
    objects = []
    low, high = config.size_range
    for cell, (colour, shape) in zip(cells, chosen):
        size = round(float(rng.uniform(low, high)), 4)
        # Clamped at 0: at the largest allowed size the margin leaves no room, and rounding can go below it.
        jitter = max(0.0, (1 - size) / 2 - CELL_MARGIN)
        dy, dx = (round(float(v), 4) for v in rng.uniform(-jitter, jitter, size=2))
        objects.append(ShapeObject(colour, shape, cell, size, (dy, dx)))
    return Scene(category, tuple(objects), word)


# ---------------------------------------------------------------------------------------------------------
# Captions


def _plural(shape: str) -> str:
    return shape + "s"


_SINGULAR = {_plural(shape): shape for shape in SHAPES}


def caption(scene: Scene) -> str:
    """The scene's caption: one part per run of equal (colour, shape) objects, then the word, joined by
    "and"; a run of n > 1 reads "two red circles at the top and the center" ("the a, the b and the c")."""
    parts = []
    for (colour, shape), run in itertools.groupby(scene.objects, key=lambda o: (o.colour, o.shape)):
        cells = [f"the {o.cell}" for o in run]
        if len(cells) == 1:
            parts.append(f"a {colour} {shape} at {cells[0]}")
        else:
            places = ", ".join(cells[:-1]) + " and " + cells[-1]
            parts.append(f"{NUMBER_WORDS[len(cells)]} {colour} {_plural(shape)} at {places}")
    if scene.word is not None:
        parts.append(f'the word "{scene.word.text}" at the {scene.word.cell}')
    return " and ".join(parts)


def caption_tokens(text: str) -> list[str]:
    """A caption split into vocabulary tokens: words, '"' and ','."""
    return _CAPTION_TOKEN.findall(text)


def vocabulary() -> tuple[str, ...]:
    """Every token a caption can contain (sorted), for any config."""
    cell_words = {w for cell in CELLS for w in cell.split()}
    tokens = {"a", "and", "at", "the", "word", '"', ","} | set(PALETTE) | set(SHAPES) | cell_words
    tokens |= {_plural(s) for s in SHAPES} | set(NUMBER_WORDS.values()) | set(WORDS)
    return tuple(sorted(tokens))


def prompt_vocabulary() -> tuple[str, ...]:
    """Every token a styled prompt can contain: `vocabulary()` in its order, then the `PROMPT_WORDS`
    (appended, so a tokenizer over it gives the caption words the ids a `vocabulary()` one does)."""
    captions = vocabulary()
    return captions + tuple(sorted(set(PROMPT_WORDS) - set(captions)))


class _Tokens:
    def __init__(self, text: str):
        self.text = text
        self.tokens = caption_tokens(text)
        self.pos = 0

    def peek(self, ahead: int = 0) -> str | None:
        i = self.pos + ahead
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self, *expected: str) -> str:
        token = self.peek()
        if token is None or (expected and token not in expected):
            want = " or ".join(repr(e) for e in expected) if expected else "a token"
            raise ValueError(f"parse_caption: expected {want} at token {self.pos} ({token!r}) of {self.text!r}")
        self.pos += 1
        return token

    def take_cell(self) -> str:
        self.take("the")
        first = self.take(*sorted({c.split()[0] for c in CELLS}))
        if self.peek() in {"left", "right"} and f"{first} {self.peek()}" in CELLS:
            return f"{first} {self.take()}"
        return first


def parse_caption(text: str) -> Scene:
    """The inverse of `caption`: the scene a caption describes (default size, no offsets). The category
    is "text" with a word, "counting" for one run of n > 1 objects, else "shapes"."""
    tokens = _Tokens(text)
    objects: list[ShapeObject] = []
    word = None
    counting = False
    while True:
        if tokens.peek() == "the":
            if word is not None:
                raise ValueError(f"parse_caption: two words in {text!r}")
            tokens.take("the")
            tokens.take("word")
            tokens.take('"')
            word_text = tokens.take(*WORDS)
            tokens.take('"')
            tokens.take("at")
            word = Word(word_text, tokens.take_cell())
        elif tokens.peek() == "a":
            tokens.take("a")
            colour, shape = tokens.take(*PALETTE), tokens.take(*SHAPES)
            tokens.take("at")
            objects.append(ShapeObject(colour, shape, tokens.take_cell()))
        else:
            count = _COUNTS[tokens.take(*_COUNTS)]
            colour, shape = tokens.take(*PALETTE), _SINGULAR[tokens.take(*_SINGULAR)]
            tokens.take("at")
            cells = [tokens.take_cell()]
            for k in range(1, count):
                tokens.take("and" if k == count - 1 else ",")
                cells.append(tokens.take_cell())
            objects.extend(ShapeObject(colour, shape, cell) for cell in cells)
            counting = True
        if tokens.peek() is None:
            break
        tokens.take("and")
    category = "text" if word is not None else "counting" if counting else "shapes"
    return Scene(category, tuple(objects), word)


# ---------------------------------------------------------------------------------------------------------
# Styled prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt for `scene` in `style` whose text names, of each object, only `attributes` (a sub-tuple of
    ATTRIBUTES, in its order); the number of objects and the word are always named."""

    text: str
    scene: Scene
    attributes: tuple[str, ...] = ATTRIBUTES
    style: str = "dense"

    def __post_init__(self):
        if not self.attributes or self.attributes != tuple(a for a in ATTRIBUTES if a in self.attributes):
            raise ValueError(f"Prompt: attributes must be a non-empty sub-tuple of {ATTRIBUTES}, got {self.attributes}")


def _noun_phrase(colour: str | None, shape: str | None, count: int, article: bool) -> str:
    """"a red circle", "two red circles", "a shape", "red shape" (no article); None leaves a word out."""
    noun = shape or "shape"
    words = [NUMBER_WORDS[count]] if count > 1 else ["a"] if article else []
    return " ".join([*words, *([colour] if colour else []), _plural(noun) if count > 1 else noun])


def _places(cells: list[str]) -> str:
    places = [f"the {cell}" for cell in cells]
    return places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]


def _groups(scene: Scene, attributes: tuple[str, ...]) -> list[tuple[str | None, str | None, list[str]]]:
    """(colour or None, shape or None, cells) per group of objects equal in the named colour and shape,
    in order of first appearance."""
    groups: dict[tuple, list[str]] = {}
    for obj in scene.objects:
        key = (obj.colour if "colour" in attributes else None, obj.shape if "shape" in attributes else None)
        groups.setdefault(key, []).append(obj.cell)
    return [(colour, shape, cells) for (colour, shape), cells in groups.items()]


def _request(scene: Scene, attributes: tuple[str, ...]) -> str:
    """The caption grammar over the named attributes: "two red shapes and a blue shape", "a circle at the
    top left and the word "SUN" at the bottom"."""
    positions = "position" in attributes
    parts = [_noun_phrase(colour, shape, len(cells), article=True) + (f" at {_places(cells)}" if positions else "")
             for colour, shape, cells in _groups(scene, attributes)]
    if scene.word is not None:
        parts.append(f'the word "{scene.word.text}"' + (f" at the {scene.word.cell}" if positions else ""))
    return " and ".join(parts)


def _keywords(scene: Scene, attributes: tuple[str, ...]) -> str:
    """Comma-separated phrases without articles: "red circle, blue square", "two red shapes",
    "circle top left, square bottom", 'word "SUN"'; with positions named, one phrase per object."""
    if "position" in attributes:
        phrases = [f"{_noun_phrase(colour, shape, 1, article=False)} {cell}"
                   for colour, shape, cells in _groups(scene, attributes) for cell in cells]
    else:
        phrases = [_noun_phrase(colour, shape, len(cells), article=False)
                   for colour, shape, cells in _groups(scene, attributes)]
    if scene.word is not None:
        phrases.append(f'word "{scene.word.text}"' + (f" {scene.word.cell}" if "position" in attributes else ""))
    return ", ".join(phrases)


def _composition(scene: Scene) -> str:
    """Every object and the word by place, in reading order of the grid: "at the top left a red circle
    and at the bottom the word "SUN"" (a run of equal objects is described object by object)."""
    items = [(CELLS.index(o.cell), f"at the {o.cell} {_noun_phrase(o.colour, o.shape, 1, article=True)}")
             for o in scene.objects]
    if scene.word is not None:
        items.append((CELLS.index(scene.word.cell), f'at the {scene.word.cell} the word "{scene.word.text}"'))
    return " and ".join(text for _, text in sorted(items))


def styled_prompt(scene: Scene, style: str, rng: np.random.Generator) -> Prompt:
    """`scene` as a prompt of `style` (one of `prompt_styles.STYLES`); the short styles draw which
    attributes they name from `rng`.

      dense        the caption: every attribute
      keywords     `_keywords` over a random one or two of ATTRIBUTES (SHORT_ATTRIBUTE_SETS, uniform)
      request      the caption grammar over a random one or two of ATTRIBUTES: "a red shape and a circle"
      instruction  "draw " + the caption: every attribute, imperative
      composition  every attribute, placed first and in the grid's reading order
    """
    from ernie_jax.data.prompt_styles import STYLES

    _check_choice("prompt style", style, STYLES)
    if style in ("keywords", "request"):
        attributes = SHORT_ATTRIBUTE_SETS[int(rng.integers(len(SHORT_ATTRIBUTE_SETS)))]
        text = (_keywords if style == "keywords" else _request)(scene, attributes)
        return Prompt(text, scene, attributes, style)
    text = {"dense": caption, "instruction": lambda s: "draw " + caption(s), "composition": _composition}[style](scene)
    return Prompt(text, scene, ATTRIBUTES, style)


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _inside(shape: str, dy: np.ndarray, dx: np.ndarray, half: float) -> np.ndarray:
    """Which points at (dy, dx) from the centre lie in `shape` with bounding-box half-side `half`."""
    if shape == "circle":
        return dy * dy + dx * dx <= half * half
    if shape == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    # Apex up, base at the bottom of the box: the half-width grows from 0 at the top to `half` at the base.
    return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)


def object_box(obj: ShapeObject, height: int, width: int) -> tuple[float, float, float]:
    """(centre y, centre x, half-side) of the object's bounding box in pixels."""
    row, col = divmod(CELLS.index(obj.cell), GRID)
    cell_h, cell_w = height / GRID, width / GRID
    return ((row + 0.5 + obj.offset[0]) * cell_h, (col + 0.5 + obj.offset[1]) * cell_w,
            obj.size * min(cell_h, cell_w) / 2)


def word_box(word: Word, height: int, width: int) -> tuple[int, int, np.ndarray]:
    """(top, left, mask [h, w]) of the word as drawn in a height x width image."""
    mask = word_mask(word.text, text_scale(height, width))
    centre_y = (_row(word.cell) + 0.5) * height / GRID
    top = math.floor(centre_y - mask.shape[0] / 2 + 0.5)
    left = math.floor(width / 2 - mask.shape[1] / 2 + 0.5)
    return top, left, mask


def render(scene: Scene, height: int, width: int) -> np.ndarray:
    """The scene as uint8 RGB `[height, width, 3]`: anti-aliased shapes and a crisp pixel-font word on a
    plain background."""
    canvas = np.empty((height, width, 3), np.float32)
    canvas[...] = BACKGROUND
    offsets = (np.arange(SUPERSAMPLING, dtype=np.float64) + 0.5) / SUPERSAMPLING
    for obj in scene.objects:
        cy, cx, half = object_box(obj, height, width)
        y0, y1 = max(0, math.floor(cy - half)), min(height, math.ceil(cy + half))
        x0, x1 = max(0, math.floor(cx - half)), min(width, math.ceil(cx + half))
        ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1) - cy
        xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1) - cx
        inside = _inside(obj.shape, ys[:, None], xs[None, :], half)
        coverage = inside.reshape(y1 - y0, SUPERSAMPLING, x1 - x0, SUPERSAMPLING).mean(axis=(1, 3))
        coverage = coverage.astype(np.float32)[..., None]
        patch = canvas[y0:y1, x0:x1]
        patch[...] = patch * (1 - coverage) + np.asarray(PALETTE[obj.colour], np.float32) * coverage
    if scene.word is not None:
        top, left, mask = word_box(scene.word, height, width)
        canvas[top:top + mask.shape[0], left:left + mask.shape[1]][mask] = TEXT_COLOUR
    return np.rint(canvas).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Records


def aesthetic(scene: Scene) -> float:
    """A synthetic aesthetic score in [1, 10] that rewards large, well-separated, centred objects:
    1 + 9 * (0.4 * separation + 0.4 * size + 0.2 * centring), each term in [0, 1]: separation = smallest
    distance between object centres / 2 cells (1 for fewer than two objects), size = mean size mapped
    from [0.4, 0.8], centring = 1 - mean |offset| / 0.15 (size and centring 0.5 and 1 without objects)."""
    objects = scene.objects
    separation = 1.0
    for a, b in itertools.combinations(objects, 2):
        (ra, ca), (rb, cb) = divmod(CELLS.index(a.cell), GRID), divmod(CELLS.index(b.cell), GRID)
        distance = math.hypot(ra + a.offset[0] - rb - b.offset[0], ca + a.offset[1] - cb - b.offset[1])
        separation = min(separation, distance / 2)
    if objects:
        size = float(np.clip((np.mean([o.size for o in objects]) - 0.4) / 0.4, 0, 1))
        centring = float(np.clip(1 - np.mean([np.abs(o.offset).mean() for o in objects]) / 0.15, 0, 1))
    else:
        size, centring = 0.5, 1.0
    return 1 + 9 * (0.4 * separation + 0.4 * size + 0.2 * centring)


def make_example(config: ShapesConfig, split: str, index: int) -> dict:
    """Record `index` of `split` (see the module docstring for its fields)."""
    scene = sample_scene(scene_rng(config, split, index), config, split)
    return {
        "image": render(scene, config.height, config.width),
        "caption": caption(scene),
        "category": scene.category,
        "aesthetic": float(np.float32(aesthetic(scene))),  # float32-exact: the same value tfds stores
        "spec": scene.to_json(),
    }


class ShapesSource:
    """The first `num` records of `split` as a random-access source (grain's protocol: `len()` and
    `source[i]`), generated on demand: the records the tfds builder would store, without a build."""

    def __init__(self, config: ShapesConfig, split: str, num: int):
        _check_choice("split", split, SPLITS)
        if num < 1:
            raise ValueError(f"ShapesSource: num must be >= 1, got {num}")
        self.config, self.split, self.num = config, split, num

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict:
        if not -self.num <= index < self.num:
            raise IndexError(f"ShapesSource: index {index} out of range for {self.num} records")
        return make_example(self.config, self.split, index % self.num)

    def __repr__(self) -> str:
        return f"ShapesSource({self.config}, split={self.split!r}, num={self.num})"


def heldout_prompts(config: ShapesConfig, num: int) -> list[tuple[str, Scene]]:
    """The first `num` (caption, scene) pairs of the "heldout" split: the fixed evaluation prompts. They do
    not depend on the image size, and none of their captions can occur in the "train" split."""
    return [(prompt.text, prompt.scene) for prompt in heldout_style_prompts(config, num, "dense")]


def heldout_style_prompts(config: ShapesConfig, num: int, style: str, seed: int = 0) -> list[Prompt]:
    """The scenes of `heldout_prompts` as prompts of `style` (`styled_prompt`): the evaluation prompts of
    experiment G, scored by `shapes_detector.score_images` on the attributes each one names. The
    attributes of a short style are drawn from (seed, index), so the keywords and request prompts of one
    scene name the same attributes."""
    prompts = []
    for index in range(num):
        scene = sample_scene(scene_rng(config, "heldout", index), config, "heldout")
        prompts.append(styled_prompt(scene, style, np.random.default_rng((seed, index))))
    return prompts
