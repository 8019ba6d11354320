"""The experiment runner (`python -m ernie_jax.main`) on each experiment's tiny variant, run as a user runs
it: stages, TensorBoard logs, sample grids, resuming, export to a pipeline that ErnieImagePipeline and
diffusers load, and one-line errors for bad overrides."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ernie_jax.training.metrics import read_scalars
from tests.conftest import run_worker

REPO = Path(__file__).resolve().parents[1]
TINY_SHAPES = "experiments/tiny_shapes.py:tiny"
PRETRAIN = "experiments/ernie_image_pretrain.py"


def run_main(workdir, config: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernie_jax.main", "--config", config, "--workdir", str(workdir),
                           *overrides], check=False, cwd=REPO, capture_output=True, text=True, timeout=900)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def load_experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metric_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def check_exported_pipeline(folder: Path, image_side: int, hidden_size: int) -> None:
    """The exported pipeline loads in ernie_jax and generates; its transformer loads in diffusers and
    computes what ernie_jax computes."""
    import torch
    from diffusers import ErnieImageTransformer2DModel

    from conversions.transformer import load_transformer
    from ernie_jax.pipeline import ErnieImagePipeline

    pipe = ErnieImagePipeline.from_pretrained(folder, dtype="float32")
    images = pipe(prompt="a red circle at the top left", height=image_side, width=image_side, num_inference_steps=2,
                  guidance_scale=2.0, seed=0, output_type="np", use_pe=False).images
    assert images.shape == (1, image_side, image_side, 3) and np.isfinite(images).all()
    assert pipe.transformer.config.hidden_size == hidden_size

    reference = ErnieImageTransformer2DModel.from_pretrained(folder / "transformer").eval()
    ours = load_transformer(folder / "transformer", "float32")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, ours.config.in_channels, 4, 4)).astype(np.float32)
    text = rng.standard_normal((1, 5, ours.config.text_in_dim)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(latents), torch.tensor([500.0]), torch.from_numpy(text),
                             torch.tensor([5]), return_dict=False)[0].numpy()
    actual = np.asarray(ours(latents, np.array([500.0], np.float32), text, np.array([5], np.int32)))
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def test_tiny_shapes_trains_exports_evaluates_and_resumes(tmp_path):
    from ernie_jax.runner.config import resolve
    from ernie_jax.runner.data import precomputed_sources

    work = tmp_path / "run"
    first = ok(run_main(work, TINY_SHAPES))
    for stage in ("components", "precompute", "export", "evaluate"):
        assert f"{stage}: wrote" in first
    assert metric_steps(work) == [0, 1]
    # The precompute stage encoded every training record once, and training reads exactly those folders.
    folder = work / "precomputed" / "64px" / "shard-00000-of-00001"
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["records"] == 64 and metadata["buckets"] == [[64, 64]] and metadata["max_text_len"] == 20
    experiment = resolve(load_experiment("tiny_shapes").get_config("tiny"), work)
    assert experiment.precomputed() == [[str(folder)]]
    (source,) = precomputed_sources(experiment)  # the train stage's sources, fingerprint-checked
    assert len(source) == 64 and sorted(source.index["source_index"]) == list(range(64))
    # A second invocation finds every stage done and redoes nothing.
    second = ok(run_main(work, TINY_SHAPES))
    assert "components: done" in second and "precompute: done" in second
    assert "train: done (2 of 2 updates)" in second
    assert "export: done" in second and "evaluate: done" in second
    assert metric_steps(work) == [0, 1]

    scalars = read_scalars(work / "logs")
    losses = [json.loads(line)["loss"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    np.testing.assert_allclose([value for _, value in scalars["train/loss"]], losses, rtol=1e-6)
    # Normalised latents and a random DiT: the loss starts near E|eps - x0|^2 = 2.
    assert all(1.0 < loss < 4.0 for loss in losses)
    assert [step for step, _ in scalars["eval/loss"]] == [2]
    assert {"train/grad_norm", "train/learning_rate", "data/skipped_at_load"} <= set(scalars)
    delivered = {}  # images per category so far, summed over the categories: batches of 4
    for tag, values in scalars.items():
        for step, value in values if tag.startswith("data/category/") else ():
            delivered[step] = delivered.get(step, 0) + value
    assert delivered == {1: 4, 2: 8}

    grid = Image.open(work / "samples" / "step_000002.png")
    assert grid.width > 2 * 64 and grid.height > 2 * 64, grid.size  # a 2x2 grid of 64px tiles
    report = json.loads((work / "eval" / "scores.json").read_text())
    assert report["num_prompts"] == 4
    assert all(0.0 <= value <= 1.0 for value in report["scores"].values() if not np.isnan(value))
    assert (work / "eval" / "samples.png").is_file()
    check_exported_pipeline(work / "pipeline", image_side=64, hidden_size=64)


def test_pretrain_tiny_runs_its_curriculum(tmp_path):
    work = tmp_path / "run"
    # Stopped after the first stage's update, then run whole: training resumes in the second stage.
    ok(run_main(work, f"{PRETRAIN}:tiny", "--config.stages=('components','train')", "--config.data.stage_steps=(1,)",
                "--config.data.batch_sizes=(2,)", "--config.data.sides=(64,)"))
    assert metric_steps(work) == [0]
    out = ok(run_main(work, f"{PRETRAIN}:tiny"))
    assert "components: done" in out and "export: wrote" in out and "evaluate: wrote" in out
    assert metric_steps(work) == [0, 1]
    scalars = read_scalars(work / "logs")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    # One update per stage: the 64 px stage's grid has smaller tiles than the 128 px stage's.
    small, large = (Image.open(work / "samples" / f"step_{s:06d}.png").size for s in (1, 2))
    assert small[0] < large[0] and small[1] < large[1]
    check_exported_pipeline(work / "pipeline", image_side=128, hidden_size=256)


def test_pretrain_variants_build(tmp_path):
    from ernie_jax.data.buckets import RELEASED_1MP, as_buckets
    from ernie_jax.runner.config import resolve
    from ernie_jax.models.dit import PRESETS

    module = load_experiment("ernie_image_pretrain")
    devices = {"8xh100": 8, "v5p-64": 32, "v6e-256": 256}
    for variant, count in devices.items():
        config = module.get_config(variant)
        config.components.path = str(tmp_path)
        config.data.source = str(tmp_path)
        experiment = resolve(config, tmp_path / variant)
        stages = experiment.curriculum.stages
        assert [s.batch_size for s in stages] == list(module.MESH_PRESETS[variant][1])
        assert stages[-1].buckets == as_buckets(RELEASED_1MP)
        assert int(np.prod(list(experiment.mesh_ici.values()))) == count
        assert experiment.transformer_config(3072, 128) == PRESETS["full"]
        assert experiment.train.num_steps == sum(config.data.stage_steps)
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("v4-8")


def test_pretrain_memory_plan_fits():
    """The plan tool's per-device memory of the 8xh100 variant's first stage, on a 1-layer model."""
    module = load_experiment("ernie_image_pretrain")
    (report,) = module.memory_plans(module.get_config("8xh100"), num_layers=1, stages=(0,))
    assert report["fits"] and report["side"] == 256 and report["batch"] == 512
    assert report["EMA weights"] == report["parameters"]
    assert report["total"] == sum(
        report[k] for k in ("parameters", "optimizer state", "EMA weights", "inputs",
                            "temporaries (activations, workspace)", "outputs (not aliased)"))


@pytest.mark.parametrize("config, override, message", [
    (TINY_SHAPES, "--config.train.no_such_key=1", "the config has no key 'no_such_key'"),
    (TINY_SHAPES, "--config.train.ema_decay=fast", "could not convert string to float"),
    (TINY_SHAPES, "--config.objective.weighting=bogus", "weighting must be one of"),
    (TINY_SHAPES, "--config.objective.name=no_such_objective", "there is no module ernie_jax.training.objectives"),
    (TINY_SHAPES, "--config.evals.samples.type=histogram", "config.evals.samples.type"),
    (TINY_SHAPES, "--config.data.stage_steps=(1,2)", "must be non-empty and of equal length"),
    (f"{PRETRAIN}:tiny", "--config.components.kind=shapes", "needs config.components.vae_steps"),
    (TINY_SHAPES, "--config.data.precomputed=('features',)", "config.stages has 'precompute'"),
])
def test_bad_overrides_give_one_line_errors(tmp_path, config, override, message):
    result = run_main(tmp_path / "run", config, override)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert result.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_training_from_precomputed_features_computes_the_losses_of_training_from_images(tmp_path):
    """The same records through the frozen encoders at every step, or precomputed once by
    `ernie_jax.data.precompute`: the same draws, batches and losses."""
    from conversions.common import run_command
    from ernie_jax.data import precompute
    from ernie_jax.data.shapes import ShapesConfig, ShapesSource
    from ernie_jax.runner.config import resolve
    from ernie_jax.runner.data import precomputed_sources
    from tests.test_data import png_bytes, write_folder

    images = tmp_path / "images"
    images.mkdir()
    records = [ShapesSource(ShapesConfig(height=64, width=64), "train", 12)[i] for i in range(12)]
    write_folder(images, [{**record, "image": png_bytes(record["image"])} for record in records])
    stages = "--config.stages=('components','train')"
    ok(run_main(tmp_path / "from_images", TINY_SHAPES, stages, f"--config.data.source={images}"))
    components = tmp_path / "from_images" / "components"
    precomputed = tmp_path / "precomputed"
    assert run_command(precompute.main, ["--model", str(components), "--source", str(images),
                                         "--buckets", "64x64", "--max-text-len", "20", "--out", str(precomputed)]) == 0
    ok(run_main(tmp_path / "from_features", TINY_SHAPES, stages, "--config.components.kind=pretrained",
                f"--config.components.path={components}", f"--config.data.precomputed=('{precomputed}',)"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("from_images", "from_features")]
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)

    # Features of other encoders are refused by the train stage's source check (in process: a third runner
    # would only add its start-up).
    other = tmp_path / "other_components"
    shutil.copytree(components, other)
    tokenizer = other / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + "\n")
    config = load_experiment("tiny_shapes").get_config("tiny")
    config.stages = ("components", "train")
    config.components.update(kind="pretrained", path=str(other))
    config.data.precomputed = (str(precomputed),)
    with pytest.raises(ValueError, match="model fingerprints differ"):
        precomputed_sources(resolve(config, tmp_path / "refused"))



@pytest.fixture(scope="module")
def sharded_runner(tmp_path_factory) -> dict:
    """tests/workers/sharded_runner.py's reports: the export and the training callbacks on fsdp=8."""

    return run_worker("sharded_runner.py", str(tmp_path_factory.mktemp("sharded_runner")))


def test_export_of_a_fully_sharded_ema_reads_no_optimizer_state(sharded_runner):
    """The export stage on 8 emulated devices (fsdp=8): the EMA weights gathered from their shards and written
    exactly (float32), from a checkpoint that holds no optimizer state at all."""
    report = sharded_runner["export"]
    assert report["kernel_shard"] == [1, 8, 128] and report["kernel_shape"] == [1, 64, 128]  # embed split 8 ways
    assert report["max_difference"] == 0.0 and report["dtypes"] == ["float32"]


def test_sample_grids_and_eval_loss_run_on_the_training_mesh(sharded_runner):
    """On 8 emulated devices (fsdp=8), the sample-grid and eval-loss programs take the EMA weights in their
    training shardings (split 8 ways, not gathered) and compute what one device computes from the gathered
    weights: measured 1/255 (grid pixels, rounding) and 8.5e-8 (loss) relative."""
    report = sharded_runner["callbacks"]
    assert report["kernel_shard"] == [1, 8, 128]
    assert report["denoise_programs"] == 1 and report["denoise_weights_as_trained"]
    assert report["eval_weights_as_trained"] and report["eval_batch_split"][0] == 1  # 8 rows split 8 ways
    assert report["grid_difference"] <= 1 and report["images_std"] > 0.01
    assert abs(report["eval_loss"] / report["reference_loss"] - 1) < 1e-5
