"""The MT-DMD study on the demo (experiments/tiny_shapes_mtdmd.py, experiments/mtdmd_shapes_study.py): a tiny
expert trained through the runner on its category alone, and the harness that scores every row of the study."""

from __future__ import annotations

import numpy as np
import pytest

from ernie_jax.data.shapes import (
    CATEGORIES,
    ShapesConfig,
    heldout_prompts,
    heldout_triples,
    render,
)


def test_domain_prompts_cover_every_category_with_held_out_scenes():
    from experiments.mtdmd_shapes_study import domain_prompts

    pairs = domain_prompts(3)
    assert [scene.category for _, scene in pairs] == [c for c in CATEGORIES for _ in range(3)]
    assert len({prompt for prompt, _ in pairs}) == len(pairs)
    heldout = heldout_triples()
    assert all(any(o.triple in heldout for o in scene.objects) for _, scene in pairs)


def test_frechet_distance_matches_the_closed_form_and_grows_with_a_perturbation():
    from experiments.mtdmd_shapes_study import detector_features, frechet_distance

    rng = np.random.default_rng(0)
    x, y = rng.normal(1.0, 2.0, (500, 1)), rng.normal(-0.5, 0.5, (400, 1))
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2  # 1-D: (mu1-mu2)^2+(s1-s2)^2
    assert np.isclose(frechet_distance(x, y), expected, rtol=1e-6)

    # Rendered held-out scenes: a set against itself, and against other scenes of the split as they are, drawn
    # one grid row lower, or washed out (halfway to the background).
    scenes = [scene for _, scene in heldout_prompts(ShapesConfig(), 200)]
    images = np.stack([render(scene, 64, 64) for scene in scenes])
    features = detector_features(images)
    assert features.shape == (200, 45)
    first, others = features[:100], images[100:]
    assert abs(frechet_distance(first, first)) < 1e-6
    same_split = frechet_distance(first, features[100:])
    shifted = frechet_distance(first, detector_features(np.roll(others, 21, axis=1)))
    washed = frechet_distance(first, detector_features((others // 2 + 12).astype(np.uint8)))
    assert 0 < same_split < 0.5 * min(shifted, washed), (same_split, shifted, washed)


def test_variants_restrict_the_experts_to_their_domain():
    from ernie_jax.runner.config import resolve
    from experiments import tiny_shapes_mtdmd

    for variant in tiny_shapes_mtdmd.VARIANTS:
        config = tiny_shapes_mtdmd.get_config(variant)
        config.components.path = config.components.path or "runs/tiny_shapes/pipeline"
        scales = resolve(config, "/tmp/unused").pipeline.sampling.category_scales
        domain = tiny_shapes_mtdmd.EXPERT_DOMAINS.get(variant.removeprefix("tiny_"))
        assert scales == ({} if domain is None else {c: 0.0 for c in CATEGORIES if c != domain})
        assert config.init.path == "components"
    with pytest.raises(ValueError, match="unknown variant"):
        tiny_shapes_mtdmd.get_config("expert_colour")


def test_tiny_text_expert_trains_on_text_only_and_the_harness_scores_it(tmp_path):
    """tiny_expert_text end to end through the runner (tiny random components, records of every category,
    2 updates), then the study's harness on its export: per-domain scores, the Fréchet distance, the speed."""
    from conversions.transformer import load_transformer
    from ernie_jax.data.precomputed import PrecomputedSource
    from ernie_jax.training.metrics import read_scalars
    from experiments.dpo_shapes_study import Evaluator
    from experiments.mtdmd_shapes_study import (
        domain_prompts,
        evaluate_row,
        seconds_per_image,
    )
    from tests.test_main import ok, run_main

    run = tmp_path / "expert"
    ok(run_main(run, "experiments/tiny_shapes_mtdmd.py:tiny_expert_text"))
    (shard,) = (run / "precomputed" / "64px").iterdir()
    categories = [str(c) for c in PrecomputedSource(shard).index["category"]]
    scalars = read_scalars(run / "logs")
    delivered = {tag.removeprefix("data/category/"): values[-1][1] for tag, values in scalars.items()
                 if tag.startswith("data/category/")}
    assert delivered == {"text": 4.0}  # 2 updates of 2 records, all text
    # The records it drew from hold every category.
    assert set(categories) == set(CATEGORIES), categories

    heldout = domain_prompts(1)
    evaluator = Evaluator(run / "components", len(heldout), 2, 3.0, "shapes", 64, batch_size=3, heldout=heldout)
    expert = load_transformer(run / "pipeline" / "transformer", "float32")
    teacher = load_transformer(run / "components" / "transformer", "float32")
    reference = evaluate_row(evaluator, teacher, None)
    got = evaluate_row(evaluator, expert, reference["features"])
    assert set(got["domains"]) == set(CATEGORIES)
    assert got["domains"]["text"]["text"] in (0.0, 1.0) and np.isnan(got["domains"]["shapes"]["text"])
    assert got["frechet"] >= 0.0 and got["features"].shape == (len(heldout), 45)
    assert 0.0 < seconds_per_image(evaluator, expert, repeats=1) < 60.0
