"""Prompt styles for SFT: the style mix, the rule rewriter, the shapes rewriter, the held-out scorer, and the
style mix in the data pipeline."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np
import pytest
from scipy import stats

from ernie_jax.data import shapes
from ernie_jax.data.pipeline import PipelineConfig, build_pipeline
from ernie_jax.data.prompt_styles import (
    INSTRUCTIONS,
    REWRITTEN_STYLES,
    STOPWORDS,
    STYLES,
    StyledSource,
    StyleMix,
    keyword_phrases,
    rule_rewrite,
)
from ernie_jax.evaluation import shapes_detector
from ernie_jax.training.components import caption_tokenizer
from tests.test_data import png_bytes, random_image, tiny_curriculum

MIX = StyleMix(weights={"keywords": 4, "request": 2, "instruction": 1, "composition": 1}, keep_dense=0.3, seed=3)
FOUR_OBJECTS = shapes.ShapesConfig(max_objects=4)


# --- the mix --------------------------------------------------------------------------------------------


def test_style_frequencies_match_the_configured_mix():
    draws = 20000
    counts = collections.Counter(MIX.style_of(index) for index in range(draws))
    expected = {"dense": 0.3, "keywords": 0.35, "request": 0.175, "instruction": 0.0875, "composition": 0.0875}
    assert MIX.probabilities == pytest.approx(expected)
    # Pearson's chi-square over the five styles (4 degrees of freedom): a correct sampler fails with
    # probability 1e-4; a sampler off by 0.01 in one share gives a statistic of ~100 here (p ~ 1e-20).
    observed = [counts[style] for style in STYLES]
    test = stats.chisquare(observed, [draws * expected[style] for style in STYLES])
    assert test.pvalue > 1e-4, (observed, test)
    # keep_dense at its bounds, and a zero weight, are honoured exactly.
    assert {StyleMix(keep_dense=1.0).style_of(i) for i in range(500)} == {"dense"}
    only = StyleMix(weights={"request": 1.0, "keywords": 0.0}, keep_dense=0.0)
    assert {only.style_of(i) for i in range(500)} == {"request"}


def test_style_and_rewrite_are_a_function_of_seed_and_index():
    records = [{"caption": f"Record{i} is a small red boat on a calm lake at the left of the frame."}
               for i in range(300)]
    source = StyledSource(records, MIX)
    forward = [source[i] for i in range(300)]
    backward = [StyledSource(records, MIX)[i] for i in reversed(range(300))][::-1]
    assert forward == backward
    # Record i's rewrite does not depend on the other records.
    assert StyledSource(records[:10], MIX)[7] == forward[7]
    assert all(r["caption_style"] == MIX.style_of(i) for i, r in enumerate(forward))
    # A one-sentence caption's composition is the caption itself; the other rewrites change it.
    assert all((r["caption_style"] in ("dense", "composition")) == (r["caption"] == records[i]["caption"])
               for i, r in enumerate(forward))
    other = StyledSource(records, dataclasses.replace(MIX, seed=4))
    changed = sum(other[i]["caption_style"] != forward[i]["caption_style"] for i in range(300))
    assert changed > 100  # two seeds agree on a style with probability sum(p^2) = 0.25


@pytest.mark.parametrize("fields, message", [
    ({"weights": {"dense": 1.0}}, "unknown styles"),
    ({"weights": {"keywords": -1.0, "request": 2.0}}, "non-negative"),
    ({"weights": {"keywords": 0.0}}, "positive sum"),
    ({"keep_dense": 1.5}, "keep_dense"),
    ({"rewriter": "gpt"}, "rewriter 'gpt'"),
    ({"rewriter": "llm"}, "rewrites"),
    ({"rewrites": "somewhere"}, "rewrites"),
])
def test_bad_style_mixes_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        StyleMix(**fields)


# --- the rule rewriter ----------------------------------------------------------------------------------

FOX = ("The image shows a red fox sitting on a mossy log in a misty forest at dawn. Sunlight filters through "
       "the pine trees. The fox looks to the left, its tail curled around its paws.")


def test_rule_rewriter_styles():
    rng = np.random.default_rng(0)
    assert rule_rewrite(FOX, "dense", rng) == FOX
    assert rule_rewrite(FOX, "keywords", rng) == ("red fox sitting, mossy log, misty forest, dawn, sunlight filters, "
                                                  "pine trees, fox looks, left")
    assert rule_rewrite(FOX, "request", rng) == "a red fox sitting on a mossy log in a misty forest"
    assert rule_rewrite("The old lighthouse stands on a cliff, waves crashing below.", "request", rng) == \
        "an old lighthouse stands on a cliff"
    instructions = {rule_rewrite(FOX, "instruction", np.random.default_rng(seed)) for seed in range(40)}
    assert instructions == {t.format("a red fox sitting on a mossy log in a misty forest at dawn")
                            for t in INSTRUCTIONS}
    # Composition: the sentence that places something first, nothing dropped.
    assert rule_rewrite(FOX, "composition", rng) == (
        "The fox looks to the left, its tail curled around its paws. A red fox sitting on a mossy log in a "
        "misty forest at dawn. Sunlight filters through the pine trees.")
    assert keyword_phrases("A cat, a cat and a dog.") == ["cat", "dog"]
    assert rule_rewrite("of the and", "keywords", rng) == "of the and"  # nothing to keep: unchanged


def test_short_rule_styles_are_shorter_and_composition_keeps_every_word():
    poster = "A poster with bold yellow title text at the top and a saxophone player in the center. Dates below."
    for caption, lead_in in ((FOX, "the image shows"), (poster, "")):
        rng = np.random.default_rng(0)
        words = {style: rule_rewrite(caption, style, rng).lower().split() for style in STYLES}
        assert len(words["keywords"]) < len(words["dense"]) and len(words["request"]) < len(words["dense"]) / 2
        assert not {w.strip(",") for w in words["keywords"]} & STOPWORDS
        kept = collections.Counter(caption.lower().split()) - collections.Counter(lead_in.split())
        assert collections.Counter(words["composition"]) == kept


# --- the shapes rewriter --------------------------------------------------------------------------------


def _scenes(count: int) -> list[shapes.Scene]:
    return [shapes.sample_scene(shapes.scene_rng(FOUR_OBJECTS, "train", i), FOUR_OBJECTS, "train")
            for i in range(count)]


def _named(text: str) -> set[str]:
    """Which attributes a shapes prompt's words name (cell words only count outside the quoted word)."""
    tokens = set(shapes.caption_tokens(re.sub(r'"[A-Z]+"', "", text)))
    named = set()
    if tokens & set(shapes.PALETTE):
        named.add("colour")
    if tokens & (set(shapes.SHAPES) | {s + "s" for s in shapes.SHAPES}):
        named.add("shape")
    return named | ({"position"} if tokens & {"top", "bottom", "left", "right", "center"} else set())


def test_shapes_rewrites_stay_in_vocabulary_and_short_styles_name_fewer_attributes():
    vocabulary = shapes.prompt_vocabulary()
    assert vocabulary[:len(shapes.vocabulary())] == shapes.vocabulary()
    tokenizer = caption_tokenizer(vocabulary)
    used, attribute_sets = set(), collections.defaultdict(collections.Counter)
    for index, scene in enumerate(_scenes(600)):
        for style in STYLES:
            prompt = shapes.styled_prompt(scene, style, np.random.default_rng(index))
            tokens = shapes.caption_tokens(prompt.text)
            assert set(tokens) <= set(vocabulary), prompt
            assert 0 not in tokenizer.encode(prompt.text).ids, prompt  # no <unk>
            used |= set(tokens)
            attribute_sets[style][prompt.attributes] += 1
            if scene.objects:
                assert _named(prompt.text) == set(prompt.attributes), prompt
            if scene.word is not None:
                assert f'"{scene.word.text}"' in prompt.text
        assert shapes.parse_caption(shapes.styled_prompt(scene, "instruction", None).text.removeprefix("draw ")) \
            == scene.without_placement()
        composition = shapes.styled_prompt(scene, "composition", None).text
        placed = re.findall(r"at the (\w+(?: left| right)?) an? (\w+) (\w+)", composition)
        assert sorted((c, s, cell) for cell, c, s in placed) == sorted(o.triple for o in scene.objects)
        assert [shapes.CELLS.index(cell) for cell, _, _ in placed] == sorted(shapes.CELLS.index(o.cell)
                                                                              for o in scene.objects)
    assert set(shapes.PROMPT_WORDS) <= used
    for style in ("dense", "instruction", "composition"):
        assert set(attribute_sets[style]) == {shapes.ATTRIBUTES}
    for style in ("keywords", "request"):
        # Every one- and two-attribute set, each about 1/6 of the time (600 draws: 100 +- 9 expected).
        assert set(attribute_sets[style]) == set(shapes.SHORT_ATTRIBUTE_SETS)
        assert all(60 <= n <= 140 for n in attribute_sets[style].values()), attribute_sets[style]


def test_counting_scenes_keep_their_count_in_short_styles():
    scene = shapes.Scene("counting", tuple(shapes.ShapeObject("red", "circle", cell) for cell in ("top", "center")))
    texts = {shapes.styled_prompt(scene, style, np.random.default_rng(seed)).text
             for style in ("keywords", "request") for seed in range(60)}
    assert {"two red circles", "two red shapes", "two circles", "two shapes at the top and the center",
            "circle top, circle center", "red shape top, red shape center"} <= texts


# --- the held-out scorer --------------------------------------------------------------------------------


def _other_shape(shape: str) -> str:
    return shapes.SHAPES[(shapes.SHAPES.index(shape) + 1) % len(shapes.SHAPES)]


def test_heldout_scorer_scores_only_the_asked_attributes():
    config = shapes.ShapesConfig()
    prompts = shapes.heldout_style_prompts(config, 120, "request", seed=1)
    assert [p.text for p in shapes.heldout_style_prompts(config, 120, "dense")] == \
        [text for text, _ in shapes.heldout_prompts(config, 120)]
    colour_only = [p for p in prompts if p.attributes == ("colour",) and p.scene.objects and p.scene.word is None]
    assert len(colour_only) >= 5
    for prompt in colour_only:
        # An image with the asked colours but every shape changed: perfect for the colour-only prompt,
        # wrong for the dense caption of the same scene.
        objects = tuple(dataclasses.replace(o, shape=_other_shape(o.shape)) for o in prompt.scene.objects)
        image = shapes.render(dataclasses.replace(prompt.scene, objects=objects), config.height, config.width)
        asked = shapes_detector.score(prompt, image)
        assert asked["colour"] == asked["object"] == asked["all"] == asked["count"] == 1.0, prompt
        assert math.isnan(asked["shape"]) and math.isnan(asked["position"])
        dense = shapes_detector.score(prompt.scene, image)
        assert dense["shape"] < 1.0 and dense["object"] == dense["all"] == 0.0
        # And a wrong colour fails it.
        recoloured = tuple(dataclasses.replace(o, colour="green" if o.colour != "green" else "red")
                           for o in prompt.scene.objects)
        image = shapes.render(dataclasses.replace(prompt.scene, objects=recoloured), config.height, config.width)
        assert shapes_detector.score(prompt, image)["all"] == 0.0
    # score_images averages a metric over the prompts that ask for it.
    shape_prompts = [p for p in prompts if "shape" in p.attributes and p.scene.objects][:3]
    chosen = colour_only[:3] + shape_prompts
    images = [shapes.render(p.scene, config.height, config.width) for p in chosen]
    images[:3] = [shapes.render(dataclasses.replace(p.scene, objects=tuple(
        dataclasses.replace(o, shape=_other_shape(o.shape)) for o in p.scene.objects)), config.height, config.width)
        for p in chosen[:3]]
    scores = shapes_detector.score_images(chosen, images)
    assert scores["shape"] == 1.0 and scores["all"] == 1.0 and scores["colour"] == 1.0


# --- the pipeline ---------------------------------------------------------------------------------------


def _styled_records(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": png_bytes(random_image(rng, 32, 32)), "category": "boats",
             "caption": f"The image shows Record{i} near a pier. A red boat rests at the left of the harbour."}
            for i in range(count)]


def test_pipeline_rewrites_captions_by_record_and_counts_styles():
    records = _styled_records(40)
    mix = StyleMix(keep_dense=0.2, seed=5)
    data = build_pipeline(records, PipelineConfig(tiny_curriculum(), seed=1, caption_styles=mix),
                          shard_index=0, shard_count=1)
    styled = StyledSource(records, mix)
    delivered = collections.Counter()
    for step in range(25):
        batch = data.dataset[step]
        for caption, style in zip(batch["captions"], batch["caption_style"]):
            index = int(re.search(r"record(\d+)", caption, re.IGNORECASE).group(1))
            assert caption == styled[index]["caption"] and STYLES[style] == mix.style_of(index)
            delivered[STYLES[style]] += 1
    summary = data.stats.summary()
    assert {name: summary[f"data/caption_style/{name}"] for name in delivered} == delivered
    assert set(delivered) == set(STYLES)
    plain = build_pipeline(records, PipelineConfig(tiny_curriculum(), seed=1), shard_index=0, shard_count=1)
    batch = plain.dataset[0]
    assert not batch["caption_style"].any() and all(c in {r["caption"] for r in records} for c in batch["captions"])
    assert plain.stats.summary()["data/caption_style/dense"] == 4
    assert len(REWRITTEN_STYLES) == 4


def test_shapes_records_get_scene_rewrites_in_the_pipeline():
    from ernie_jax.data.curriculum import Curriculum, Stage

    source = shapes.ShapesSource(shapes.ShapesConfig(), "train", 40)
    mix = StyleMix(keep_dense=0.2, seed=1, rewriter="shapes")
    data = build_pipeline(source, PipelineConfig(Curriculum((Stage(0, None, ((64, 64),), 8),)), caption_styles=mix),
                          shard_index=0, shard_count=1)
    styled = StyledSource(source, mix)
    expected = {}
    for index in range(len(source)):
        record = styled[index]
        scene = shapes.Scene.from_json(record["spec"])
        rng = mix.rng(index)
        assert mix.choose(rng) == record["caption_style"]  # the style draw comes first, then the rewrite's
        assert record["caption"] == shapes.styled_prompt(scene, record["caption_style"], rng).text
        expected.setdefault(record["caption"], set()).add(record["caption_style"])
    vocabulary = set(shapes.prompt_vocabulary())
    for step in range(6):
        batch = data.dataset[step]
        for caption, style in zip(batch["captions"], batch["caption_style"]):
            assert STYLES[style] in expected[caption] and set(shapes.caption_tokens(caption)) <= vocabulary
