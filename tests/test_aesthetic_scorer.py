"""Our aesthetic scorer: the model against transformers' CLIP and a torch head, which variables each tower
tuning trains, the manifests, and training through the project's trainer: a from-scratch ViT learns the
synthetic set's known ranking, and a LoRA run on a (tiny random) CLIP folder resumes bit-exactly."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from conversions.vision_tower import load_image_preprocessor, load_vision_tower
from ernie_jax.aesthetics import train_scorer
from ernie_jax.data.aesthetic_manifest import build_scorer_pipeline, read_manifest
from ernie_jax.data.synthetic_aesthetics import SyntheticAestheticsConfig, write_synthetic_aesthetics
from ernie_jax.models import lora
from ernie_jax.models.aesthetic_scorer import AestheticScorer, ScorerHeadConfig, trained_variables
from ernie_jax.models.vision_tower import VisionTower, VisionTowerConfig
from tests.conftest import relative_error
from tests.test_vision_towers import CLIP_PREPROCESSOR, TEXT, VISION, images, randomise, save

FP32_TOLERANCE = 1e-5
K = 10


def load_experiment(name):
    import importlib

    return importlib.import_module(f"experiments.{name}")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """XLA's persistent compilation cache for this file's runs: a resumed run compiles the same programs as the
    first one (its train step, initialisation, scoring), and reads them back instead of compiling again."""
    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
                "jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}
    from jax.experimental.compilation_cache import compilation_cache

    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # a process that compiled before checked the (then unset) cache once only
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    clip = randomise(CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)), 7)
    return clip, save(clip, tmp_path_factory.mktemp("clip"), CLIP_PREPROCESSOR)


def test_scorer_matches_clip_and_a_torch_head(clip_folder):
    from transformers import CLIPImageProcessorPil

    clip, folder = clip_folder
    head = ScorerHeadConfig(features="embeds", normalize=True, hidden=(8,), num_levels=K)
    scorer = AestheticScorer(load_vision_tower(folder), head, rngs=nnx.Rngs(3))
    # Thresholds away from their even start, one gap far negative: still ordered.
    scorer.threshold_gaps[...] = jnp.asarray(np.random.default_rng(0).normal(0, 2, K - 2).clip(-8), jnp.float32)
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=images(), return_tensors="pt")["pixel_values"]
    assert relative_error(load_image_preprocessor(folder)(images()), pixels.numpy()) == 0.0

    first, second = (torch.tensor(np.asarray(layer.kernel[...]).T) for layer in scorer.head)
    first_bias, second_bias = (torch.tensor(np.asarray(layer.bias[...])) for layer in scorer.head)
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=pixels)
        features = F.normalize(getattr(features, "pooler_output", features), dim=-1)
        expected = F.linear(F.gelu(F.linear(features, first, first_bias)), second, second_bias)[:, 0].numpy()
        gaps = F.softplus(torch.tensor(np.asarray(scorer.threshold_gaps[...])))
        thresholds = float(scorer.first_threshold[...][0]) + torch.cat([torch.zeros(1), torch.cumsum(gaps, 0)])
        above = torch.sigmoid(torch.tensor(expected)[:, None] - thresholds[None, :])
        cumulative = torch.cat([torch.ones(3, 1), above, torch.zeros(3, 1)], dim=1)
        expected_probabilities = (cumulative[:, :-1] - cumulative[:, 1:]).numpy()

    scores = np.asarray(scorer.score(pixels.numpy()))
    assert scores.shape == (3,) and relative_error(scores, expected) <= FP32_TOLERANCE
    assert np.ptp(expected) > 100 * FP32_TOLERANCE * np.abs(expected).max()  # the images' scores differ
    assert np.all(np.diff(np.asarray(scorer.thresholds())) > 0)
    probabilities = np.asarray(scorer.level_probabilities(pixels.numpy()))
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-6)
    assert probabilities.min() >= 0


def test_each_tuning_trains_its_variables():
    config = VisionTowerConfig(family="clip", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, image_size=16, patch_size=8, hidden_act="quick_gelu",
                               layer_norm_eps=1e-5)

    def build():
        rngs = nnx.Rngs(0)
        tower = lora.add_lora(VisionTower(config, rngs=rngs), lora.LoRAConfig(rank=2, target_modules=(
            "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")), rngs)
        return AestheticScorer(tower, ScorerHeadConfig(hidden=(4,), num_levels=K), rngs=rngs)

    model = nnx.eval_shape(build)
    for tuning, expected in (("frozen", 6), ("lora", 6 + 12), ("full", len(nnx.to_flat_state(nnx.state(model))))):
        trained = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, trained_variables(tuning)))]
        assert len(trained) == expected, (tuning, trained)
        head = [p for p in trained if not p.startswith("tower.")]
        assert sorted(head) == ["first_threshold", "head.0.bias", "head.0.kernel", "head.1.bias", "head.1.kernel",
                                "threshold_gaps"]
        adapters = [p for p in trained if ".lora." in p]
        assert len(adapters) == (12 if tuning != "frozen" else 0)  # a and b of 6 stacked linears
    with pytest.raises(ValueError, match="tower tuning 'half'"):
        trained_variables("half")


def test_manifests_are_read_checked_and_batched(tmp_path):
    data = write_synthetic_aesthetics(tmp_path / "set", SyntheticAestheticsConfig(num_train=12, num_heldout=4, size=8,
                                                                                 rounds=4))
    from ernie_jax.data.image_preprocess import ImagePreprocessor

    preprocess = ImagePreprocessor.from_config({"image_processor_type": "CLIPImageProcessor", "size": 8,
                                                "crop_size": 8})
    pairs = read_manifest(data / "pairs.csv")
    # 3 annotators x 4 Swiss rounds x 6 pairs.
    assert pairs.kind == "pairs" and len(pairs) == 72 and set(np.unique(pairs.columns["outcome"])) <= {0, 1}
    batch = next(build_scorer_pipeline(pairs, preprocess.one, batch_size=5, seed=0).iterator())
    assert batch["images_a"].shape == batch["images_b"].shape == (5, 3, 8, 8) and batch["outcome"].shape == (5,)
    levels = read_manifest(data / "levels.csv")
    assert levels.kind == "labels" and set(levels.category_names) <= {"collage", "emblem", "pattern"}
    assert levels.columns["levels"].min() == 1 and levels.columns["levels"].max() == K
    batch = next(build_scorer_pipeline(levels, preprocess.one, batch_size=4, seed=0).iterator())
    assert sorted(batch) == ["category", "images", "levels"] and batch["levels"].dtype == np.int32
    # The annotation service's JSON export: items with item paths and aggregated levels.
    export = {"campaign": "c", "items": [{"item": "images/00000.png", "level": 3, "score": 0.1},
                                         {"item": "images/00001.png", "level": 7, "score": 0.9}]}
    (data / "export.json").write_text(json.dumps(export))
    assert read_manifest(data / "export.json").columns["levels"].tolist() == [3, 7]

    bad = {"outcome.csv": "image_a,image_b,outcome\nimages/00000.png,images/00001.png,draw\n",
           "missing.csv": "image,level\nimages/nope.png,3\n",
           "level.csv": "image,level\nimages/00000.png,0\n",
           "columns.csv": "picture,score\na.png,3\n"}
    messages = {"outcome.csv": "line 2: outcome 'draw' is not one of", "missing.csv": "nope.png does not exist",
                "level.csv": "level 0 is below 1", "columns.csv": "neither a pairs manifest"}
    for name, text in bad.items():
        (data / name).write_text(text)
        with pytest.raises(ValueError, match=messages[name]):
            read_manifest(data / name)
    with pytest.raises(ValueError, match="fewer than its batch size"):
        build_scorer_pipeline(levels, preprocess.one, batch_size=13, seed=0)


def test_config_errors_are_named(tmp_path):
    from ernie_jax.main import runner_of

    module = load_experiment("aes_tiny_vit")
    config = module.get_config("tiny_pairwise")
    assert runner_of(config) is train_scorer  # python -m ernie_jax.main runs the scorer's configs with it
    config.runner = "ernie_jax.no_such.runner"
    with pytest.raises(ValueError, match="config.runner 'ernie_jax.no_such.runner'"):
        runner_of(config)
    for overrides, message in (({"objective": {"name": "aesthetic_listwise"}}, "no module"),
                               ({"tower": {"tuning": "half"}}, "config.tower.tuning 'half'"),
                               ({"tower": {"kind": "pretrained", "path": str(tmp_path)}}, "no config.json")):
        config = module.get_config("tiny_pairwise")
        for key, values in overrides.items():
            config[key].update(values)
        with pytest.raises(ValueError, match=message):
            train_scorer.resolve(config, tmp_path)
    # The ordinal objective on a pairs manifest: refused before any compute.
    config = module.get_config("tiny_ordinal")
    config.data.train = "synthetic:pairs.csv"
    with pytest.raises(ValueError, match=r"reads \['images', 'levels'\], which the pairs manifest"):
        train_scorer.run(config, tmp_path / "run")


def test_tiny_vit_learns_the_synthetic_ranking(tmp_path):
    config = load_experiment("aes_tiny_vit").get_config("tiny_regression")
    results = train_scorer.run(config, tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text()) == results
    assert results["images"] == 64 and results["target"] == "ratings"
    assert sorted(results["category_bias"]) == ["collage", "emblem", "pattern"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == config.data.num_steps
    experiment = train_scorer.resolve(config, tmp_path)
    untrained = train_scorer.evaluate(experiment, train_scorer.scorer_model(experiment, trained=False))
    # The held-out images' true quality (symmetry, harmony, clutter, roughness) is learnt from the simulated
    # annotators' Likert scores: SRCC 0.54, 0.70, 0.75 for seeds 0-2 at this size (the Bradley-Terry loss on Swiss
    # pairs needs more updates to leave its start: docs/aesthetic_scorer.md).
    assert results["srcc"] > 0.4 and results["srcc"] > abs(untrained["srcc"]) + 0.2, (results, untrained)
    # The run's folder alone gives the trained scorer as an images -> scores callable.
    from PIL import Image

    from ernie_jax.aesthetics.metrics import srcc

    heldout = read_manifest(tmp_path / "synthetic" / "heldout.csv")
    scores = train_scorer.load_trained_scorer(tmp_path, batch_size=16)(
        [Image.open(path) for path in heldout.columns["image"]])
    assert scores.shape == (64,) and srcc(scores, heldout.columns["ratings"]) == pytest.approx(results["srcc"])


def test_clip_lora_run_resumes_bit_exactly(clip_folder, tmp_path):
    from ernie_jax.training.checkpoints import Checkpoints
    from ernie_jax.training.state import abstract_train_state

    _, folder = clip_folder
    data = write_synthetic_aesthetics(tmp_path / "set", SyntheticAestheticsConfig(num_train=16, num_heldout=4, size=32,
                                                                                 rounds=4))
    config = load_experiment("aes_clip").get_config("tiny-ordinal-lora")
    config.tower.path, config.data.train = str(folder), str(data / "levels.csv")
    config.data.eval = ""

    train_scorer.run(config, tmp_path / "straight")
    config.data.num_steps = 2
    train_scorer.run(config, tmp_path / "resumed")
    config.data.num_steps = 4
    train_scorer.run(config, tmp_path / "resumed")
    losses = {run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "resumed")}
    assert len(losses["straight"]) == 4 and losses["resumed"] == losses["straight"]

    experiment = train_scorer.resolve(config, tmp_path)
    _, abstract = abstract_train_state(experiment.parts(), seed=0, mesh=experiment.mesh(), rules=experiment.rules)
    weights = {}
    for run in ("straight", "resumed"):
        checkpoints = Checkpoints(tmp_path / run / "checkpoints")
        weights[run] = [checkpoints.restore_weights(abstract, ema=ema)["scorer"] for ema in (False, True)]
        checkpoints.close()
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(weights["straight"][0])]
    assert any(".lora." in p for p in paths) and "first_threshold" in paths  # adapters and head, not the base
    assert not any(p.endswith("q_proj.kernel") for p in paths)
    for ours, theirs in zip(jax.tree.leaves(weights["straight"]), jax.tree.leaves(weights["resumed"]), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # Fresh adapters' B matrices are zero: training moved them.
    trained_b = [np.asarray(v) for p, v in nnx.to_flat_state(weights["straight"][0]) if p[-2:] == ("lora", "b")]
    assert trained_b and all(np.abs(b).max() > 0 for b in trained_b)
