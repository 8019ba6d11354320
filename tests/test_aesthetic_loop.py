"""The aesthetic loop (issue 15): the quality measured from pixels against the aesthetic domain's true quality,
the `trained:` scorer kind, and experiments/aesthetic_dpo_study.py end to end at test size."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import stats

from ernie_jax.data import aesthetic_shapes
from ernie_jax.data.shapes import ShapeObject
from ernie_jax.evaluation import aesthetic_measure, shapes_detector


@pytest.fixture(scope="module")
def renders():
    return aesthetic_shapes.render_scenes(300, seed=11)


@pytest.fixture(scope="module")
def measured(renders):
    return aesthetic_measure.measure_images(renders.images)


def test_the_formula_is_the_domains(renders):
    for scene in renders.scenes[:50]:
        assert aesthetic_measure.quality_of(aesthetic_shapes.factors(scene)) == pytest.approx(
            aesthetic_shapes.quality(scene), abs=1e-12)


def test_measured_quality_ranks_renders_as_the_true_quality(renders, measured):
    assert set(renders.categories) == set(aesthetic_shapes.CATEGORIES)
    rho = stats.spearmanr(measured["quality"], renders.quality)[0]
    assert rho > 0.99  # 0.996 on these 300 scenes
    assert np.abs(measured["quality"] - renders.quality).mean() < 0.2  # 0.12


def _cell_symmetry(scene) -> float:
    """Symmetry with twins matched on colour, shape and cell only, what the detector can see."""
    present = {obj.triple for obj in scene.objects}
    return sum((obj.colour, obj.shape, aesthetic_measure._mirrored_cell(obj.cell)) in present
               for obj in scene.objects) / len(scene.objects)


def test_harmony_and_symmetry_are_exact_where_the_detector_reads_every_object(renders, measured):
    read_fully = [sorted(o.triple for o in shapes_detector.detect(image)) == sorted(o.triple for o in scene.objects)
                  for image, scene in zip(renders.images, renders.scenes, strict=True)]
    assert np.mean(read_fully) > 0.95
    cell_symmetry = np.array([_cell_symmetry(scene) for scene in renders.scenes])
    full = np.array(read_fully)
    np.testing.assert_array_equal(measured["harmony"][full], renders.factors["harmony"][full])
    np.testing.assert_allclose(measured["symmetry"][full], cell_symmetry[full], atol=1e-12)
    # Cell symmetry differs from the exact factor only for collages with mirrored lookalikes of other sizes.
    differs = ~np.isclose(cell_symmetry, renders.factors["symmetry"])
    assert set(renders.categories[differs]) <= {"collage"}
    assert differs.mean() < 0.03


def test_clutter_counts_the_specks_within_one(renders, measured):
    true_specks = renders.factors["clutter"] * aesthetic_shapes.MAX_SPECKS
    error = measured["specks"] - np.rint(true_specks)
    assert np.mean(np.abs(error) <= 1) >= 0.8 and np.mean(error == 0) >= 0.5  # 0.85 and 0.52
    assert error.max() <= 0  # edge noise is never taken for a speck; the misses are specks on or by objects
    assert stats.spearmanr(measured["clutter"], renders.factors["clutter"])[0] > 0.9


def test_roughness_reads_the_edge_noise_amplitude(renders, measured):
    amplitude = np.rint(renders.factors["roughness"] * aesthetic_shapes.MAX_EDGE_NOISE)
    error = measured["roughness"] * aesthetic_shapes.MAX_EDGE_NOISE - amplitude
    assert stats.spearmanr(measured["roughness"], renders.factors["roughness"])[0] > 0.99
    assert np.median(np.abs(error)) < 2 and np.percentile(np.abs(error), 90) < 8


def test_roughness_grows_with_the_noise_of_one_scene_and_is_zero_without_it():
    scene = aesthetic_shapes.AestheticScene(
        "pattern", (ShapeObject("red", "circle", "top left", 0.6), ShapeObject("red", "circle", "top right", 0.6),
                    ShapeObject("blue", "square", "bottom", 0.55)), noise_seed=3)
    levels = np.linspace(0, 1, 11)
    readings = [aesthetic_measure.measure(aesthetic_shapes.render(dataclasses.replace(scene, roughness=r), 64, 64))
                for r in levels]
    roughness = np.array([reading["roughness"] for reading in readings])
    assert roughness[0] < 0.01 and np.all(np.diff(roughness) > 0)  # rounding of anti-aliased edges at 0
    np.testing.assert_allclose(roughness, levels, atol=0.06)
    clean = readings[0]
    assert (clean["symmetry"], clean["harmony"], clean["clutter"]) == pytest.approx((1.0, 2 / 3, 0.0), abs=1e-12)
    assert clean["quality"] == pytest.approx(aesthetic_shapes.quality(scene), abs=0.01)


def test_an_image_without_objects_has_no_symmetry_or_harmony():
    blank = np.broadcast_to(np.array(aesthetic_shapes.shapes.BACKGROUND, np.uint8), (64, 64, 3)).copy()
    reading = aesthetic_measure.measure(blank)
    assert reading["objects"] == 0 and reading["symmetry"] == 0 and reading["harmony"] == 0
    assert reading["quality"] == pytest.approx(1 + 9 * 0.4)  # clean and uncluttered, nothing else


@pytest.fixture(scope="module")
def scorer_run(tmp_path_factory):
    """A scorer training run at the smallest size that writes a checkpoint."""
    from ernie_jax.aesthetics import train_scorer
    from experiments.aes_tiny_vit import get_config

    config = get_config("tiny_pairwise")
    config.data.synthetic.update(num_train=32, num_heldout=16)
    config.data.update(batch_size=8, num_steps=2)
    config.train.update(checkpoint_every=2)
    config.train.optimizer.update(warmup_steps=1, decay_steps=2)
    workdir = tmp_path_factory.mktemp("scorer")
    train_scorer.run(config, workdir)
    return workdir


def test_the_trained_kind_is_the_runs_scorer_and_refuses_other_folders(scorer_run, tmp_path):
    from ernie_jax.aesthetics.scorers import load_scorer
    from ernie_jax.aesthetics.train_scorer import load_trained_scorer
    from ernie_jax.evaluation.rewards import load_reward

    images = aesthetic_shapes.render_scenes(5, seed=0).images
    expected = load_trained_scorer(scorer_run)(list(images))
    assert np.ptp(expected) > 0
    np.testing.assert_allclose(load_scorer(f"trained:{scorer_run}", batch_size=2)(list(images)), expected, rtol=1e-5)
    np.testing.assert_allclose(load_reward(f"aesthetic:trained:{scorer_run}")(images, ["a"] * 5), expected, rtol=1e-5)
    dit_run = tmp_path / "dit"
    (dit_run / "checkpoints").mkdir(parents=True)
    (dit_run / "config.json").write_text(json.dumps({"name": "tiny_shapes"}))
    for folder in (dit_run, tmp_path / "missing", tmp_path):
        with pytest.raises(ValueError, match="not the folder of a scorer training run"):
            load_scorer(f"trained:{folder}")


def test_the_study_runs_the_loop_at_test_size(scorer_run, tmp_path):
    from ernie_jax.data.preferences import PreferenceSource
    from experiments import aesthetic_dpo_study

    report, study = tmp_path / "report.md", tmp_path / "study"
    aesthetic_dpo_study.main(["--small", "--scorer", str(scorer_run), "--out", str(study), "--seeds", "0",
                              "--steps", "2", "--eval-every", "2", "--prompts", "2", "--pair-prompts", "2",
                              "--samples", "2", "--sample-steps", "2", "--report", str(report)])
    (pairs,) = [PreferenceSource(str(folder)) for folder in sorted((study / "pairs" / "pairs").iterdir())]
    assert len(pairs) == 2
    for index in range(len(pairs)):
        rewards = pairs[index]["origin"]["rewards"]
        assert rewards[0] > rewards[1]  # chosen is the sample the scorer prefers
    results = json.loads((study / "results.json").read_text())
    base = results["base"]["same_seeds"]
    assert 1 <= base["quality"] <= 10 and set(base["detector"]) >= {"colour", "shape", "all"}
    (row,) = results["runs"]["2"]
    assert row["seed"] == 0 and 0 <= row["quality_win_rate"] <= 1 and row["latent_energy_distance"] > 0
    text = report.read_text()
    assert "| base | 0 |" in text and "| ernie | 2 |" in text
