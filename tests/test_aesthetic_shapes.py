"""The synthetic aesthetic domain (`ernie_jax.data.aesthetic_shapes`): quality is the documented formula of the
factors (checked on scenes built by hand), the rendered images show each factor, rendering is seeded, and the
categories' quality distributions differ (two-sample Kolmogorov-Smirnov, scipy)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from ernie_jax.data import shapes
from ernie_jax.data.aesthetic_shapes import (
    CATEGORIES,
    MAX_EDGE_NOISE,
    MAX_SPECKS,
    PALETTE,
    AestheticScene,
    Speck,
    edge_band,
    factors,
    quality,
    render,
    render_scenes,
    write_image_folder,
)
from ernie_jax.data.shapes import ShapeObject
from ernie_jax.data.sources import FolderSource, decode_image

SIDE = 64
# Two red circles mirrored across the vertical axis (offsets mirrored too): symmetric, one colour, clean.
PAIR = (ShapeObject("red", "circle", "left", 0.6, (0.05, 0.08)),
        ShapeObject("red", "circle", "right", 0.6, (0.05, -0.08)))
PERFECT = AestheticScene("pattern", PAIR)


def with_objects(*objects) -> AestheticScene:
    return dataclasses.replace(PERFECT, objects=tuple(objects))


def specks(count: int) -> tuple[Speck, ...]:
    """`count` specks on the top row's background, apart from each other and from the objects."""
    return tuple(Speck(0.04, 0.05 + 0.075 * k, "yellow") for k in range(count))


def test_quality_is_the_documented_formula_of_the_factors():
    assert factors(PERFECT) == {"symmetry": 1.0, "harmony": 1.0, "clutter": 0.0, "roughness": 0.0}
    assert quality(PERFECT) == pytest.approx(10.0)
    left, right = PAIR
    # symmetry weighs 0.35: no twin left (another shape, or the same offset instead of the mirrored one).
    assert quality(with_objects(left, dataclasses.replace(right, shape="square"))) == pytest.approx(10 - 9 * 0.35)
    assert quality(with_objects(left, dataclasses.replace(right, offset=left.offset))) == pytest.approx(10 - 9 * 0.35)
    # A centre-column object is its own twin only without a horizontal offset: 2 of 3 objects have twins.
    off_centre = ShapeObject("red", "square", "top", 0.6, (0.0, 0.05))
    assert factors(with_objects(*PAIR, dataclasses.replace(off_centre, offset=(0.1, 0.0))))["symmetry"] == 1.0
    assert quality(with_objects(*PAIR, off_centre)) == pytest.approx(10 - 9 * 0.35 / 3)
    # harmony weighs 0.25: a second colour costs a third of it, four colours all of it.
    assert quality(with_objects(*PAIR, ShapeObject("blue", "square", "top"))) == pytest.approx(10 - 9 * 0.25 / 3)
    # Four colours in cells whose mirrors hold another colour or nothing: no twins either.
    cells = ("top left", "top right", "left", "bottom left")
    four = [ShapeObject(colour, "square", cell) for colour, cell in zip(PALETTE, cells, strict=True)]
    assert factors(with_objects(*four))["harmony"] == 0.0
    # clutter and roughness weigh 0.2 each and lower the quality.
    assert quality(dataclasses.replace(PERFECT, specks=specks(6))) == pytest.approx(10 - 9 * 0.2 * 6 / MAX_SPECKS)
    assert quality(dataclasses.replace(PERFECT, roughness=0.5)) == pytest.approx(10 - 9 * 0.2 * 0.5)
    worst = AestheticScene("collage", tuple(four), specks(MAX_SPECKS), roughness=1.0)
    assert factors(worst) == {"symmetry": 0.0, "harmony": 0.0, "clutter": 1.0, "roughness": 1.0}
    assert quality(worst) == pytest.approx(1.0)
    cluttered = [quality(dataclasses.replace(PERFECT, specks=specks(count))) for count in range(MAX_SPECKS + 1)]
    rough = [quality(dataclasses.replace(PERFECT, roughness=value)) for value in np.linspace(0, 1, 5)]
    assert np.all(np.diff(cluttered) < 0) and np.all(np.diff(rough) < 0)
    with pytest.raises(ValueError, match="roughness 1.5 is not in"):
        dataclasses.replace(PERFECT, roughness=1.5)
    with pytest.raises(ValueError, match="needs y and x in"):
        Speck(1.2, 0.5, "red")
    with pytest.raises(ValueError, match="share a cell"):
        with_objects(left, dataclasses.replace(right, cell="left"))


def test_the_images_show_the_factors():
    image = render(PERFECT, SIDE, SIDE)
    np.testing.assert_array_equal(image, shapes.render(shapes.Scene("shapes", PAIR), SIDE, SIDE))
    # Symmetric objects render mirror-symmetric (up to rounding); a broken twin does not.
    assert np.abs(image.astype(int) - image[:, ::-1]).max() <= 1
    broken = render(with_objects(PAIR[0], dataclasses.replace(PAIR[1], shape="triangle")), SIDE, SIDE)
    assert np.abs(broken.astype(int) - broken[:, ::-1]).max() > 100
    # Specks: 2x2 squares at 64 px, each in its colour, nothing else changed.
    speckled = render(dataclasses.replace(PERFECT, specks=specks(5)), SIDE, SIDE)
    changed = np.any(speckled != image, axis=-1)
    assert changed.sum() == 5 * 4 and np.all(speckled[changed] == PALETTE["yellow"])
    corners = render(dataclasses.replace(PERFECT, specks=(Speck(0, 0, "blue"), Speck(1, 1, "green"))), SIDE, SIDE)
    assert np.all(corners[:2, :2] == PALETTE["blue"]) and np.all(corners[-2:, -2:] == PALETTE["green"])
    # Roughness: noise only on the clean image's edge band, growing with the roughness, bounded by its amplitude.
    band = edge_band(image)
    assert 0 < band.sum() < 0.3 * SIDE * SIDE
    deviations = []
    for roughness in (0.25, 0.5, 1.0):
        rough = render(dataclasses.replace(PERFECT, roughness=roughness), SIDE, SIDE).astype(int)
        assert np.all(rough[~band] == image[~band])
        deviation = np.abs(rough[band] - image[band])
        assert deviation.max() <= round(roughness * MAX_EDGE_NOISE)
        deviations.append(deviation.mean())
    assert deviations[0] < deviations[1] < deviations[2]
    # Harmony: the pixels of a three-colour scene hold exactly its palette colours (and the background).
    three = with_objects(*PAIR, ShapeObject("blue", "square", "top"), ShapeObject("green", "triangle", "bottom"))
    colours = {tuple(pixel) for pixel in render(three, SIDE, SIDE).reshape(-1, 3)}
    assert {name for name, rgb in PALETTE.items() if rgb in colours} == {"red", "blue", "green"}


def test_rendered_sets_are_seeded_and_agree_with_their_scenes():
    scenes = render_scenes(24, seed=1)
    assert scenes.images.shape == (24, SIDE, SIDE, 3) and scenes.images.dtype == np.uint8
    again = render_scenes(8, seed=1)
    np.testing.assert_array_equal(again.images, scenes.images[:8])  # a prefix is the same scenes
    np.testing.assert_array_equal(again.quality, scenes.quality[:8])
    assert not np.array_equal(render_scenes(8, seed=2).images, again.images)
    for index, scene in enumerate(scenes.scenes):
        np.testing.assert_array_equal(scenes.images[index], render(scene, SIDE, SIDE))
        assert scenes.quality[index] == quality(scene) and scenes.categories[index] == scene.category
        assert {name: values[index] for name, values in scenes.factors.items()} == factors(scene)
    assert np.all((scenes.quality >= 1) & (scenes.quality <= 10))
    only = render_scenes(6, seed=0, height=48, width=96, category_weights={"collage": 1.0})
    assert set(only.categories) == {"collage"} and only.images.shape == (6, 48, 96, 3)
    with pytest.raises(ValueError, match="non-negative weights"):
        render_scenes(4, seed=0, category_weights={"posters": 1.0})


def test_categories_have_different_quality_distributions():
    scenes = render_scenes(300, seed=0)
    by_category = {name: scenes.quality[scenes.categories == name] for name in CATEGORIES}
    assert all(len(values) >= 80 for values in by_category.values())
    for first, second in [("emblem", "pattern"), ("emblem", "collage"), ("pattern", "collage")]:
        assert stats.ks_2samp(by_category[first], by_category[second]).pvalue < 1e-3, (first, second)
        assert by_category[first].mean() > by_category[second].mean()
    # Quality varies inside every category too, so rankings within a category are meaningful.
    assert all(values.std() > 0.5 for values in by_category.values())
    # Each factor moves the generated data's quality in its documented direction.
    for name, sign in (("symmetry", 1), ("harmony", 1), ("clutter", -1), ("roughness", -1)):
        assert sign * stats.spearmanr(scenes.factors[name], scenes.quality).statistic > 0.2, name


def test_an_image_folder_of_the_scenes_reads_back(tmp_path):
    scenes = render_scenes(4, seed=3)
    source = FolderSource(write_image_folder(tmp_path / "domain", scenes))
    assert len(source) == 4
    for index in range(4):
        record = source[index]
        np.testing.assert_array_equal(decode_image(record["image"]), scenes.images[index])
        assert record["category"] == scenes.categories[index] and "aesthetic" not in record
        assert shapes.parse_caption(record["caption"]).objects == shapes.Scene(
            "shapes", scenes.scenes[index].objects).without_placement().objects
