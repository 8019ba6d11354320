"""The MT-DMD study on the demo (experiments/tiny_shapes_mtdmd.py, experiments/mtdmd_shapes_study.py): a tiny
expert trained through the runner on its category alone, and the harness that scores every row of the study."""

from __future__ import annotations

import jax
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


def test_student_ablations_change_only_their_objective_fields_and_keep_the_update_size():
    from experiments import tiny_shapes_mtdmd

    for name, (student, fields) in tiny_shapes_mtdmd.ABLATIONS.items():
        ablation, base = (tiny_shapes_mtdmd.get_config(v).to_dict() for v in (name, student))
        assert {k: v for k, v in ablation["objective"].items() if base["objective"].get(k) != v} == fields, name
        per_update = [c["data"]["batch_sizes"][0] / (c["objective"]["critic_updates"] + 1) for c in (ablation, base)]
        assert per_update == [tiny_shapes_mtdmd.STUDENT_UPDATE_BATCH] * 2, name
        # The GAN head trains with the critic, at its learning rate; nothing else differs.
        assert ablation["parts"] == base["parts"] | ({"discriminator": base["parts"]["critic"]}
                                                     if fields.get("gan_weight", 0) > 0 else {}), name
        for config in (ablation, base):
            del config["objective"], config["data"]["batch_sizes"], config["parts"], config["name"], config["variant"]
        assert ablation == base, name


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


def test_tiny_mtdmd_student_trains_both_parts_and_routes_only_text_to_the_expert(tmp_path, monkeypatch):
    """tiny_student_mtdmd through the runner twice, on text records only and on no text records: the student
    and the critic change in every update, and the logged gate mass of the text expert is 1 in every generator
    update of the first run and 0 in every one of the second (the teacher's the complement). The expert here is
    the tiny random teacher itself: the gate, not the expert's weights, is under test."""
    import orbax.checkpoint as ocp

    from ernie_jax.training.metrics import read_scalars
    from tests.test_main import ok, run_main

    # The second run compiles the same train step: share XLA's compilations between the two processes.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

    def student_run(name: str, categories: tuple[str, ...], stages: str, *reuse: str) -> dict:
        config = tmp_path / f"{name}.py"
        config.write_text(
            "from experiments.tiny_shapes_mtdmd import get_config as variant\n\n\n"
            "def get_config():\n"
            "    config = variant('tiny_student_mtdmd')\n"
            f"    config.data.sampling.category_scales = {{c: 0.0 for c in {CATEGORIES!r} if c not in {categories!r}}}\n"
            "    return config\n")
        run = tmp_path / name
        components = tmp_path / "text" / "components"
        ok(run_main(run, str(config), f"--config.frozen.expert_text.path={components}",
                    "--config.train.checkpoint_every=1", "--config.train.async_checkpoints=False",
                    f"--config.stages={stages}", *reuse))
        scalars = read_scalars(run / "logs")
        delivered = {tag.removeprefix("data/category/") for tag in scalars if tag.startswith("data/category/")}
        assert delivered == set(categories)
        states = [ocp.StandardCheckpointer().restore(run / "checkpoints" / str(step) / "state")["params"]
                  for step in (1, 2)]
        for part in ("transformer", "critic"):
            changes = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                       zip(*(jax.tree.leaves(state[part]) for state in states))]
            assert max(changes) > 0, part
        return {name: [value for _, value in scalars[f"train/generator/gate/dm/{name}"]]
                for name in ("teacher", "expert_text")}

    text = student_run("text", ("text",), "('components','precompute','train')")
    assert text == {"teacher": [0.0, 0.0], "expert_text": [1.0, 1.0]}
    # The first run's components and records, as a study passes them: no VAE training or encoding again.
    (shard,) = (tmp_path / "text" / "precomputed" / "64px").iterdir()
    others = student_run("others", ("shapes", "counting"), "('train',)", "--config.components.kind=pretrained",
                         f"--config.components.path={tmp_path / 'text' / 'components'}",
                         f"--config.data.precomputed=('{shard}',)")
    assert others == {"teacher": [1.0, 1.0], "expert_text": [0.0, 0.0]}


def test_ablation_table_pairs_each_ablation_with_its_student_by_seed():
    from experiments.mtdmd_shapes_study import DOMAIN_METRICS, Row, ablation_table

    def entry(seed, value, frechet):
        return {"seed": seed, "frechet": frechet,
                "domains": {d: {"all": value, m: 2 * value} for d, m in DOMAIN_METRICS.items()}}

    rows = {Row("student_dmd2", 8, 1.0).name: [entry(0, 0.2, 0.03), entry(1, 0.4, 0.05), entry(2, 0.9, 0.9)],
            Row("student_dmd2_gan", 8, 1.0).name: [entry(0, 0.3, 0.02), entry(1, 0.4, 0.02)]}
    lines = ablation_table({"rows": rows})
    (gan,) = [line for line in lines if line.startswith("| student_dmd2_gan minus student_dmd2")]
    cells = [cell.strip() for cell in gan.strip("|").split("|")]
    assert cells[2] == "[0, 1]"  # seed 2 has no ablation run: not paired
    # differences per seed: all +0.1 and 0.0 (mean 0.05, sd 0.0707), the metric twice that; Fréchet -0.01, -0.03.
    assert cells[3:5] == ["0.050 ± 0.071", "0.100 ± 0.141"] and cells[-1] == "-0.020 ± 0.014"
    assert not any("ttur1" in line or "noised_data" in line for line in lines)  # no rows, no line


def test_student_table_pairs_the_committee_with_dmd2_by_seed_beside_the_equal_cost_sampler():
    from experiments.mtdmd_shapes_study import DOMAIN_METRICS, GUIDANCE, TEACHER, Row, student_table

    def entry(seed, value):
        return {"seed": seed, "frechet": 0.0,
                "domains": {d: {"all": value, m: 2 * value} for d, m in DOMAIN_METRICS.items()}}

    teacher_rows = {Row(TEACHER, 50, GUIDANCE): 0.3, Row(TEACHER, 8, GUIDANCE): 0.25, Row(TEACHER, 8, 1.0): 0.1}
    rows = {row.name: [entry(None, value)] for row, value in teacher_rows.items()}
    rows[Row("student_dmd2", 8, 1.0).name] = [entry(0, 0.2), entry(1, 0.1), entry(2, 0.3)]
    rows[Row("student_mtdmd", 8, 1.0).name] = [entry(1, 0.2), entry(0, 0.2)]  # seed 2 missing: not paired
    results = {"rows": rows, "floor": entry(None, 0.35)}
    lines = student_table(results)
    shapes = next(line for line in lines if line.startswith("| shapes | all"))
    shapes = [cell.strip() for cell in shapes.split("|")[1:-1]]
    # teacher 50, 8 Euler, 8 without CFG, 4 Euler (no row yet), DMD2, MT-DMD, MT-DMD minus DMD2 (0.0 and +0.1), floor
    assert shapes[2:] == ["0.300", "0.250", "0.100", "-", "0.200 ± 0.100", "0.200 ± 0.000", "0.050 ± 0.071",
                          "+0.050"]
    rows[Row(TEACHER, 4, GUIDANCE).name] = [entry(None, 0.15)]
    counts = next(line for line in student_table(results) if line.startswith("| counting | count"))
    assert [cell.strip() for cell in counts.split("|")[1:-1]][5] == "0.300"
    del rows[Row("student_mtdmd", 8, 1.0).name]
    assert student_table(results) == []


def test_study_refuses_unknown_variants_and_malformed_overrides_before_running(tmp_path, capsys):
    from experiments.mtdmd_shapes_study import main

    for argv, message in ((["--variants", "student_dmd2", "student_dmd3"], "--variants ['student_dmd3']"),
                          (["--set", "train.optimizer.learning_rate"], "expected FIELD=VALUE")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "study"), "--small", *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()
