"""Post-training through the runner: SFT (whole DiT and LoRA) and DPO on tiny random components, as a
user runs them, and their exports against diffusers."""

from __future__ import annotations

import numpy as np
import pytest


def mean_brightness(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """A deterministic reward for tests (`--config.pairs.reward=tests.test_post_training:mean_brightness`):
    random tiny models draw images the shapes detector cannot tell apart."""
    return images.reshape(len(images), -1).mean(axis=1) / 255.0


def _velocity(transformer, latents, text) -> np.ndarray:
    return np.asarray(transformer(latents, np.array([500.0, 250.0], np.float32), text, np.array([5, 3], np.int32)))


def _inputs(config) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, config.in_channels, 4, 4)).astype(np.float32),
            rng.standard_normal((2, 5, config.text_in_dim)).astype(np.float32))


def _checked_one_layer_plan(report: dict) -> int:
    """Checks that a one-layer memory plan's rows add up to its total; returns the one-layer DiT's parameter count."""
    import dataclasses

    import jax
    from flax import nnx

    from ernie_jax.models.dit import PRESETS, abstract_transformer

    assert report["total"] == sum(
        report[k] for k in ("parameters", "optimizer state", "EMA weights", "frozen models", "inputs",
                            "temporaries (activations, workspace)", "outputs (not aliased)"))
    one_layer = dataclasses.replace(PRESETS["full"], num_layers=1)
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract_transformer(one_layer), nnx.Param)))


def test_dpo_tiny_lora_runs_every_stage_and_exports_adapters_diffusers_applies(tmp_path):
    """experiments/ernie_image_dpo.py:tiny-lora as a user runs it (components, pairs from its own samples,
    LoRA-DPO against the base with the adapters off, export, evaluate). At step 0 the reference is the policy
    exactly (B starts at 0, and the reference is the same base arrays without adapters): DPO loss log 2, equal
    errors. The exported LoRA file, which diffusers' load_lora_weights applies to the base pipeline, computes
    what our exported (merged) transformer computes. The SFT and DPO configs share the LoRA export (the SFT
    run is README's doc test)."""
    import json

    import torch
    from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel

    from conversions.transformer import load_transformer
    from ernie_jax.data.preferences import PreferenceSource
    from tests.test_main import ok, run_main

    workdir = tmp_path / "dpo"
    # lr 0.1 (the config's 1e-5 is for the trained 8B DiT) so that one update moves the adapters measurably.
    ok(run_main(workdir, "experiments/ernie_image_dpo.py:tiny-lora", "--config.train.optimizer.learning_rate=0.1"))
    (pairs,) = [PreferenceSource(str(folder)) for folder in sorted((workdir / "pairs").iterdir())]
    assert len(pairs) == 2
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert [row["step"] for row in rows] == [0, 1]
    assert first["dpo_loss"] == np.float32(np.log(2)) and first["velocity_norm_ratio"] == 1.0
    assert (first["policy_chosen_error"], first["policy_rejected_error"]) == (
        first["reference_chosen_error"], first["reference_rejected_error"])
    assert (workdir / "eval" / "samples.png").stat().st_size > 0

    base = load_transformer(workdir / "components" / "transformer", "float32")
    latents, text = _inputs(base.config)
    ours = _velocity(load_transformer(workdir / "pipeline" / "transformer", "float32"), latents, text)
    reference = ErnieImageTransformer2DModel.from_pretrained(workdir / "components" / "transformer").eval()
    pipe = ErnieImagePipeline(transformer=reference, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    pipe.load_lora_weights(workdir / "pipeline" / "lora")
    with torch.no_grad():
        expected = pipe.transformer(torch.from_numpy(latents), torch.tensor([500.0, 250.0]), torch.from_numpy(text),
                                    torch.tensor([5, 3]), return_dict=False)[0].numpy()
    unadapted = _velocity(base, latents, text)
    assert np.abs(expected - unadapted).max() > 1e-3 * np.abs(unadapted).max()  # the adapters do something
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_dpo_study_runs_dpo_through_the_runner_at_test_size(tmp_path):
    """experiments/dpo_shapes_study.py end to end at test size, which is the tiny DPO experiment through the
    runner: pairs from the starting model scored by a reward (brightness here), DPO against the starting
    model as the frozen reference (the same weights at step 0: logit 0, DPO loss log 2, velocity-norm ratio
    1), then apart; the evaluation against the base on the same prompts and seeds, and the report."""
    import json

    from ernie_jax.data.preferences import PreferenceSource
    from experiments import dpo_shapes_study

    report, study = tmp_path / "report.md", tmp_path / "study"
    dpo_shapes_study.main(["--small", "--out", str(study), "--seeds", "0", "--variants", "ernie", "--steps", "3",
                           "--eval-every", "3", "--prompts", "2", "--sample-steps", "2", "--report", str(report),
                           "--pairs", "offline", "online", "--refresh-every", "2", "--round-prompts", "2"])
    (pairs,) = [PreferenceSource(str(folder)) for folder in sorted((study / "pairs" / "pairs").iterdir())]
    assert len(pairs) == 2
    for index in range(len(pairs)):
        rewards = pairs[index]["origin"]["rewards"]
        assert rewards[0] > rewards[1]  # chosen is the brighter sample
    rows = [json.loads(line) for line in (study / "ernie-seed0" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["dpo_loss"] == np.float32(np.log(2)) and first["reward_margin"] == 0.0
    assert first["velocity_norm_ratio"] == 1.0 and first["implicit_accuracy"] == 0.0
    assert first["policy_chosen_error"] == first["reference_chosen_error"]
    assert np.isclose(first["loss"], first["dpo_loss"] + 0.35 * first["policy_chosen_error"]
                      + 0.15 * first["policy_rejected_error"], rtol=1e-6)
    # Warm-up leaves the first update at lr 0; after the second the policy has left the reference.
    assert last["reward_margin"] != 0.0 and last["velocity_norm_ratio"] != 1.0
    assert last["policy_chosen_error"] != last["reference_chosen_error"]

    results = json.loads((study / "results.json").read_text())
    (row,) = results["runs"]["ernie"]["3"]
    assert 0.0 <= row["win_rate"] <= 1.0 and row["eval_loss"] is not None
    assert 0.0 < row["latent_energy_distance"] < 1.0  # the samples moved, but little
    assert "| ernie | 3 |" in report.read_text()

    # The online run made two rounds of pairs itself (2 prompts, 2 samples each: 2 pairs): round 0 with the
    # policy of update 0, which is the base, so the offline pairs again (same prompts and seeds); round 1 with
    # the policy after one update at lr > 0, so other samples. The run starts, as the offline one, from the
    # reference, and its results differ from the offline run's only through round 1.
    online = study / "ernie_online-seed0"
    rounds = [PreferenceSource(str(online / "pairs" / f"round-{r:06d}")) for r in range(2)]
    assert [len(pairs_of_round) for pairs_of_round in rounds] == [2, 2]
    offline = {pairs[i]["caption"]: pairs[i]["latents"] for i in range(len(pairs))}
    for i in range(2):
        np.testing.assert_array_equal(rounds[0][i]["latents"], offline[rounds[0][i]["caption"]])
        assert not np.array_equal(rounds[1][i]["latents"], offline[rounds[1][i]["caption"]])
    rows = [json.loads(line) for line in (online / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["dpo_loss"] == np.float32(np.log(2)) and len(rows) == 3
    (online_row,) = results["runs"]["ernie_online"]["3"]
    assert online_row["latent_energy_distance"] != row["latent_energy_distance"]
    assert "| ernie_online | 3 |" in report.read_text()


def test_energy_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    from experiments.dpo_shapes_study import energy_distance

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    assert abs(energy_distance(x, x)) < 1e-9
    near, far = energy_distance(x, x + 0.1), energy_distance(x, x + 1.0)
    assert 0 < near < far
    # Two samples of one distribution: much closer than a shift by one standard deviation.
    assert energy_distance(x, rng.standard_normal((200, 8))) < 0.2 * far


def test_dpo_variants_build(tmp_path):
    """Every variant of the 8B DPO config resolves: DPO from the components' transformer against its frozen
    bf16 self, the report's stabilized values, pairs (half the pre-training 1024^2 stage's images) at 1024^2."""
    from ernie_jax.data.buckets import RELEASED_1MP, as_buckets
    from ernie_jax.models.dit import PRESETS
    from ernie_jax.runner.config import resolve
    from tests.test_main import load_experiment

    module = load_experiment("ernie_image_dpo")
    pretrain = load_experiment("ernie_image_pretrain")
    assert set(module.VARIANTS) == {f"{mesh}{suffix}" for mesh in (*pretrain.MESH_PRESETS, "tiny")
                                    for suffix in ("", "-lora")}
    for variant in module.VARIANTS:
        config = module.get_config(variant)
        mesh, lora = variant.removesuffix("-lora"), variant.endswith("-lora")
        if mesh != "tiny":
            config.components.path = str(tmp_path)
            config.data.preferences = (str(tmp_path),)
        experiment = resolve(config, tmp_path / variant)
        objective = experiment.objective
        assert (objective.variant, objective.lambda_win, objective.lambda_lose) == ("ernie", 0.35, 0.15)
        assert experiment.init_path == str(experiment.components_dir)
        assert dict(config.frozen.reference) == {"path": "init", "dtype": "bfloat16" if mesh != "tiny" else "float32"}
        assert (experiment.lora is not None) == lora
        if mesh == "tiny":
            assert "pairs" in config.stages
            continue
        # The report's beta 0.05 on errors summed over the 128 x 64 x 64 latent elements of a 1024^2 image.
        assert objective.reduction == "sum" and objective.beta == 0.05 * 128 * 64 * 64
        # Pre-training's clip norm 1.0 in the same per-element-mean units: at tiny size the whole DiT's
        # summed-error gradient norm is about 900, so a clip at 1.0 cut every update.
        assert config.train.optimizer.clip_norm == 128 * 64 * 64
        stage, = experiment.curriculum.stages
        assert stage.batch_size == pretrain.MESH_PRESETS[mesh][1][-1] // 2
        assert stage.buckets == as_buckets(RELEASED_1MP)
        assert experiment.transformer_config(3072, 128) == PRESETS["full"]
        assert config.lora.base_dtype == "bfloat16" and (not lora or experiment.lora.rank == 64)
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("v4-8-lora")


@pytest.mark.parametrize("variant", ["8xh100", "8xh100-lora"])
def test_dpo_memory_plan_fits_on_8xh100(variant):
    """The plan tool's per-device memory of the 8xh100 DPO step, full and LoRA, on a 1-layer model: the
    policy's train state, the bf16 reference (LoRA: the base, which is also the reference, once) and a batch
    of pairs."""


    from tests.test_main import load_experiment

    module = load_experiment("ernie_image_dpo")
    (report,) = module.memory_plans(module.get_config(variant), num_layers=1)
    assert report["fits"] and report["side"] == 1024 and report["batch"] == 16
    count = _checked_one_layer_plan(report)
    # The bf16 DiT split 8 ways, once (norms and biases are not split: 2%).
    assert abs(report["frozen models"] - count * 2 / 8) <= 0.02 * report["frozen models"]
    if variant == "8xh100":
        assert report["frozen models"] == report["parameters"] // 2
    else:  # rank-64 adapters' Adam moments, far below the whole DiT's (8 bytes a parameter, split 8 ways)
        assert report["optimizer state"] < count * 8 / 8 / 10
    assert report["EMA weights"] == 0  # the config's ema_decay 0: the trainer keeps no copy


def test_sft_variants_build(tmp_path):
    """Every variant of the SFT config resolves: from the components' transformer, the report's style mix
    (a quarter of the captions kept dense), LoRA rank 64 on the block projections for `-lora`, 1024^2."""
    from conversions.lora import BLOCK_LINEARS
    from ernie_jax.data.buckets import RELEASED_1MP, as_buckets
    from ernie_jax.runner.config import resolve
    from tests.test_main import load_experiment

    module = load_experiment("ernie_image_sft")
    for variant in module.VARIANTS:
        config = module.get_config(variant)
        mesh, lora = variant.removesuffix("-lora"), variant.endswith("-lora")
        if mesh != "tiny":
            config.components.path = str(tmp_path)
            config.data.source = str(tmp_path)
        experiment = resolve(config, tmp_path / variant)
        assert experiment.init_path == str(experiment.components_dir)
        assert experiment.pipeline.caption_styles.keep_dense == 0.25
        assert (experiment.lora is not None) == lora
        if lora:
            assert experiment.lora.rank == (4 if mesh == "tiny" else 64)
            assert experiment.lora.target_modules == tuple(BLOCK_LINEARS)
        if mesh != "tiny":
            (stage,) = experiment.curriculum.stages
            assert stage.buckets == as_buckets(RELEASED_1MP)
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("v4-8")


def test_part_settings_override_the_trainer_defaults(tmp_path):
    """`config.parts.NAME` gives a part its own optimizer fields and EMA decay; a part the objective does not
    train, an unknown key or a bad value is one error naming it."""
    import ml_collections

    from ernie_jax.runner.config import resolve
    from tests.test_main import load_experiment

    config = load_experiment("ernie_image_sft").get_config("tiny")
    config.parts = ml_collections.ConfigDict({"transformer": {"optimizer": {"learning_rate": 3e-6}, "ema_decay": 0.5}})
    experiment = resolve(config, tmp_path)
    optimizer, ema_decay = experiment.part_settings("transformer")
    assert (optimizer.learning_rate, ema_decay) == (3e-6, 0.5)
    assert optimizer.clip_norm == config.train.optimizer.clip_norm
    for parts, message in (({"critic": {}}, r"config.parts.critic: the objective's parts are \('transformer',\)"),
                           ({"transformer": {"lr": 1.0}}, r"unknown keys \['lr'\]"),
                           ({"transformer": {"optimizer": {"lr": 1.0}}}, "config.parts.transformer.optimizer"),
                           ({"transformer": {"ema_decay": 2.0}}, "ema_decay must be in")):
        config.parts = ml_collections.ConfigDict(parts)
        with pytest.raises(ValueError, match=message):
            resolve(config, tmp_path)


def test_mtdmd_tiny_trains_through_the_runner_and_exports_the_student(tmp_path):
    """experiments/ernie_image_mtdmd.py:tiny end to end (components, two DMD steps of 5 critic updates and one
    generator update each, export): the exported transformer loads in diffusers and computes what the
    checkpoint's student computes, and no longer what the teacher (the components' transformer) computes."""
    import json

    import torch
    from diffusers import ErnieImageTransformer2DModel

    from ernie_jax.runner.config import resolve
    from ernie_jax.runner.stages.export import trained_transformer
    from tests.test_main import load_experiment, ok, run_main

    workdir = tmp_path / "mtdmd"
    ok(run_main(workdir, "experiments/ernie_image_mtdmd.py:tiny", "--config.stages=('components','train','export')",
                "--config.export.use_ema=False"))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert all(np.isfinite(rows[-1][k]) for k in ("critic/loss", "generator/loss", "generator/gate/dm/teacher"))

    def diffusers_velocity(folder, latents, text):
        model = ErnieImageTransformer2DModel.from_pretrained(folder).eval()
        with torch.no_grad():
            return model(torch.from_numpy(latents), torch.tensor([500.0, 250.0]), torch.from_numpy(text),
                         torch.tensor([5, 3]), return_dict=False)[0].numpy()

    config = load_experiment("ernie_image_mtdmd").get_config("tiny")
    config.export.use_ema = False
    student = trained_transformer(resolve(config, workdir), ema=False, step=2)
    latents, text = _inputs(student.config)
    exported = diffusers_velocity(workdir / "pipeline" / "transformer", latents, text)
    teacher = diffusers_velocity(workdir / "components" / "transformer", latents, text)
    ours = _velocity(student, latents, text)
    assert np.abs(exported - ours).max() <= 1e-5 * np.abs(ours).max()
    assert np.abs(exported - teacher).max() > 1e-2 * np.abs(teacher).max()  # the student moved


@pytest.mark.parametrize("variant", ["8xh100", "8xh100-lora"])
def test_mtdmd_memory_plan_fits_on_8xh100(variant):
    """The plan tool's per-device memory of the 8xh100 MT-DMD step on a 1-layer model with two teachers (the
    base and one expert): student and critic train states; the frozen bf16 teachers (LoRA: the shared base,
    which is also the first teacher, once, and the expert)."""


    from tests.test_main import load_experiment

    module = load_experiment("ernie_image_mtdmd")
    config = module.with_expert_teachers(module.get_config(variant), {"text": "/experts/text"})
    (report,) = module.memory_plans(config, num_layers=1)
    assert report["fits"] and report["side"] == 1024 and report["batch"] == 48
    count = _checked_one_layer_plan(report)
    # Two bf16 DiTs split 8 ways (norms and biases are not split: 2%): the two teachers, or the LoRA base
    # shared by student, critic and the first teacher, and the expert.
    assert abs(report["frozen models"] - 2 * count * 2 / 8) <= 0.02 * report["frozen models"]
    # The student's EMA only: the config's critic has ema_decay 0, and the trainer keeps no copy of it.
    assert report["EMA weights"] == report["parameters"] // 2
    if variant == "8xh100":  # student and critic: two fp32 DiTs, and their Adam moments
        assert report["frozen models"] == report["parameters"] // 2
        assert abs(report["optimizer state"] - 2 * report["parameters"]) <= 1e-3 * report["parameters"]
    else:  # two sets of rank-64 adapters' Adam moments, far below one whole DiT's (8 bytes a parameter)
        assert report["optimizer state"] < 2 * count * 8 / 8 / 10


def test_mtdmd_variants_build(tmp_path):
    """Every variant of the MT-DMD config resolves to the DMD objective the runner makes: student and critic
    from the components' transformer, the teacher that transformer frozen in bf16 ("init"), an 8-step cfg-1
    student with the pipeline's shift, TTUR 5 on a batch of six images per device, guidance 4 (the base
    pipeline's); `-experts` adds the two expert teachers and the sigma gate, whose routes pick the layout
    expert only at high noise and the text expert only at low noise, and whose folders must be given."""
    from ernie_jax.runner.config import resolve
    from ernie_jax.training.objectives import dmd
    from tests.test_main import load_experiment

    module = load_experiment("ernie_image_mtdmd")
    pretrain = load_experiment("ernie_image_pretrain")
    assert set(module.VARIANTS) == {f"{mesh}{lora}{experts}" for mesh in (*pretrain.MESH_PRESETS, "tiny")
                                    for lora in ("", "-lora") for experts in ("", "-experts")}
    for variant in module.VARIANTS:
        config = module.get_config(variant)
        mesh = variant.removesuffix("-experts").removesuffix("-lora")
        lora, experts = "-lora" in variant, variant.endswith("-experts")
        if mesh != "tiny":
            config.components.path = str(tmp_path)
            config.data.source = str(tmp_path)
        experiment = resolve(config, tmp_path / variant)
        objective = experiment.objective
        assert isinstance(objective, dmd.Config) and experiment.part_names == ("critic", "transformer")
        assert objective.teachers == (("teacher", "text", "layout") if experts else ("teacher",))
        assert dict(config.frozen.teacher) == {"path": "init", "dtype": "bfloat16" if mesh != "tiny" else "float32"}
        assert (experiment.lora is not None) == lora and experiment.init_path == str(experiment.components_dir)
        assert objective.student_shift is None  # the pipeline's, at the train stage
        assert experiment.part_settings("critic")[1] == 0.0 and experiment.part_settings("transformer")[1] == 0.999
        if experts:
            table = dmd.gate_table(objective)  # [sigma bins, domains + 1, terms, teachers]
            assert table[0, 0, 0].tolist() == [0.5, 0.5, 0.0] and table[1, 0, 0].tolist() == [1.0, 0.0, 0.0]
            assert table[2, 0, 1].tolist() == [0.5, 0.0, 0.5]
        if mesh == "tiny":
            continue
        assert (objective.student_steps, objective.guidance_scale, objective.critic_updates) == (8, 4.0, 5)
        (stage,) = experiment.curriculum.stages
        devices = pretrain.MESH_PRESETS[mesh][0]["fsdp"]
        assert stage.batch_size == 6 * devices and config.evaluation.guidance_scale == 1.0
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("8xh100-experts-lora")
    # The experts' folders are the user's to give: left empty, the train stage says which.
    from ernie_jax.runner.stages.train import frozen_model

    config = module.get_config("8xh100-experts")
    config.components.path = config.data.source = str(tmp_path)
    with pytest.raises(ValueError, match="config.frozen.text.path is empty"):
        frozen_model(resolve(config, tmp_path / "experts"), "text", {}, None, None)
