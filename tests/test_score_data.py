"""The batch scoring job (`ernie_jax.aesthetics.score_data`) and the scored manifest it writes
(`ernie_jax.data.scored`), with a brightness scorer: scores land on the right records, a killed or sharded job
gives the same bytes, filters keep what they say, and the training pipeline reading the manifest draws
categories in the proportions the scores give them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conversions.common import run_command
from ernie_jax.aesthetics import score_data as job
from ernie_jax.aesthetics import scorers
from ernie_jax.data.precompute import open_source
from ernie_jax.data.scored import MANIFEST_FILE, ScoredSource
from tests.test_aesthetic_reward import write_tiny_scorer

# Category -> the grey levels of its images (one image each); one more file is not an image.
LEVELS = {"bright": [200, 210, 220, 230, 240, 250], "dim": [40, 60, 80, 100, 120, 140, 160, 180], "dark": [10, 20, 30]}
CORRUPT = "c_corrupt.png"
CHUNK, BATCH = 5, 2


def brightness(images) -> np.ndarray:
    """Mean pixel value / 25.5: a 0-10 score of the images alone."""
    return np.array([np.asarray(image, np.float64).mean() / 25.5 for image in images])


class Interrupted(Exception):
    """Stands for a kill."""


class CountingScorer:
    """`brightness`, counting the images it scores; raises `Interrupted` at call `fail_at` (if given)."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.images, self.fail_at = 0, 0, fail_at

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted
        self.images += len(images)
        return brightness(images)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """An image folder: 16x16 grey images named by category and level, each with a caption and a category."""
    folder = tmp_path_factory.mktemp("data") / "images"
    folder.mkdir()
    for category, levels in LEVELS.items():
        for level in levels:
            path = folder / f"{category}_{level:03d}.png"
            Image.fromarray(np.full((16, 16, 3), level, np.uint8)).save(path)
            path.with_suffix(".txt").write_text(f"a {category} square")
            path.with_suffix(".json").write_text(json.dumps({"category": category}))
    (folder / CORRUPT).write_bytes(b"not a png")
    (folder / CORRUPT).with_suffix(".txt").write_text("broken")
    return folder


def expected_scores(source) -> dict[int, tuple[str, float]]:
    """source index -> (category, score) of every readable image, from the file names."""
    scores = {}
    for index, path in enumerate(source.paths):
        if path.name != CORRUPT:
            category, level = path.stem.split("_")
            scores[index] = (category, int(level) / 25.5)
    return scores


def run(data: Path, out: Path, scorer=brightness, **settings):
    settings = {"chunk_size": CHUNK, "batch_size": BATCH, "workers": 2, "progress": False, **settings}
    return job.score_data(open_source(data), scorer, out, source_path=str(data), scorer_spec="test:brightness",
                          **settings)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def scored(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "images.scored"
    run(data, out)
    return out


def test_every_readable_record_gets_its_score(data, scored):
    metadata = json.loads((scored / MANIFEST_FILE).read_text())
    source = ScoredSource(scored)
    expected = expected_scores(source.base)
    assert len(source.base) == 18 and metadata["source_records"] == 18
    assert metadata["records"] == metadata["scored"] == 17 and metadata["filtered_out"] == 0
    assert metadata["unreadable"] == {"UnidentifiedImageError": 1}
    assert source.source_indices.tolist() == sorted(expected)
    for position in range(len(source)):
        record = source[position]
        category, score = expected[int(source.source_indices[position])]
        assert record["category"] == category and record["caption"] == f"a {category} square"
        assert record["aesthetic"] == pytest.approx(score, rel=1e-12)
    # The data folder is left as it was: the scores are only in the manifest.
    assert all("aesthetic" not in json.loads(path.read_text()) for path in data.glob("*.json"))
    assert isinstance(open_source(scored), ScoredSource)


def test_a_killed_job_resumes_to_the_same_bytes(data, scored, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        run(data, out, CountingScorer(fail_at=7))  # in chunk 2: chunks 0 and 1 (3 batches each) are written
    assert sorted(path.name for path in (out / job.CHUNKS_DIR).glob("chunk-*")) == ["chunk-000000.npz",
                                                                                   "chunk-000001.npz"]
    assert not (out / MANIFEST_FILE).exists()
    # Killed while writing chunk 2: no partial chunk is left behind.
    def killed_while_writing(file, **arrays):
        file.write(b"partial")
        raise Interrupted

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupted):
        patch.setattr(np, "savez", killed_while_writing)
        run(data, out)
    assert sorted(path.name for path in (out / job.CHUNKS_DIR).iterdir()) == ["chunk-000000.npz", "chunk-000001.npz"]
    resumed = CountingScorer()
    metadata = run(data, out, resumed)
    assert resumed.images == 18 - 2 * CHUNK  # only chunks 2 and 3 are scored again
    assert metadata["records"] == 17
    assert folder_bytes(out) == folder_bytes(scored)
    again = CountingScorer()
    run(data, out, again)
    assert again.calls == 0 and folder_bytes(out) == folder_bytes(scored)


def test_shards_score_their_chunks_and_the_last_one_writes_the_manifest(data, scored, tmp_path):
    out = tmp_path / "sharded"
    first, second = CountingScorer(), CountingScorer()
    assert run(data, out, first, shard_index=1, shard_count=2) is None  # chunks 1 and 3: 5 + 3 records
    assert not (out / MANIFEST_FILE).exists() and first.images == CHUNK - 1 + 3  # chunk 1 holds the corrupt file
    assert run(data, out, second, shard_index=0, shard_count=2)["records"] == 17
    assert folder_bytes(out) == folder_bytes(scored)


def test_filters_keep_what_they_say(data, scored, tmp_path):
    source = open_source(data)
    expected = expected_scores(source)
    out = tmp_path / "filtered"
    metadata = run(data, out, min_score=100 / 25.5)
    kept = ScoredSource(out).source_indices.tolist()
    assert kept == sorted(i for i, (_, score) in expected.items() if score >= 100 / 25.5)
    assert metadata["filtered_out"] == 17 - len(kept) == 6
    # Quantile 0.5 over each category by hand: bright (6 levels) keeps its top 3, dim (8) its top 4, dark (3)
    # its median and above (2).
    metadata = job.write_manifest(out, json.loads((out / job.JOB_FILE).read_text()), None, 0.5)
    kept = {Path(source.paths[i]).stem for i in ScoredSource(out).source_indices}
    assert kept == {"bright_230", "bright_240", "bright_250", "dim_120", "dim_140", "dim_160", "dim_180",
                    "dark_020", "dark_030"}
    assert metadata["filter"] == {"min_score": None, "category_quantile": 0.5}


def test_category_weighting_draws_by_the_scores(scored):
    from ernie_jax.data.categories import SamplingConfig
    from ernie_jax.data.curriculum import Curriculum, Stage
    from ernie_jax.data.pipeline import PipelineConfig, build_pipeline

    sampling = SamplingConfig(category_formula="count_x_aesthetic", within_category="uniform")
    config = PipelineConfig(Curriculum((Stage(0, None, ((16, 16),), 32),)), sampling)
    data = build_pipeline(open_source(scored), config, shard_index=0, shard_count=1)
    names = data.category_names
    assert names == ("bright", "dark", "dim")
    # w_c = N_c * mean score_c = the category's total score: sum of its levels / 25.5.
    weights = np.array([sum(LEVELS[name]) for name in names], np.float64)
    expected = weights / weights.sum()
    np.testing.assert_allclose(data.tables[0].category_probs, expected, rtol=1e-6)
    counts = np.zeros(len(names))
    steps = 100
    for step in range(steps):
        counts += np.bincount(data.dataset[step]["category"], minlength=len(names))
    draws = steps * 32
    tolerance = 4 * np.sqrt(expected * (1 - expected) / draws)
    np.testing.assert_array_less(np.abs(counts / draws - expected), tolerance)
    # Without scores the same formula would draw by count alone, which these draws rule out.
    by_count = np.array([len(LEVELS[name]) for name in names]) / 17
    assert np.abs(counts / draws - by_count).max() > 2 * tolerance.max()


def test_command_line(data, scored, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(scorers.SCORERS, "test", lambda argument, batch_size: brightness)
    out = tmp_path / "cli"
    argv = ["--scorer", "test:brightness", "--source", str(data), "--out", str(out), "--batch-size", str(BATCH),
            "--workers", "2", "--chunk-size"]
    assert run_command(job.main, [*argv, str(CHUNK)]) == 0
    assert "17 of 18 records kept" in capsys.readouterr().out
    assert folder_bytes(out) == folder_bytes(scored)
    assert run_command(job.main, [*argv, "4"]) == 1
    assert "holds the chunks of another job (different ['chunk_size']" in capsys.readouterr().err
    assert run_command(job.main, ["--scorer", "nope:x", "--source", str(data), "--out", str(tmp_path / "x")]) == 1
    assert "expected KIND:ARGUMENT with KIND one of" in capsys.readouterr().err
    assert run_command(job.main, ["--scorer", "test:x", "--source", str(data), "--out", str(data)]) == 1
    assert "is the source itself" in capsys.readouterr().err
    assert run_command(job.main, [*argv[:6], "--category-quantile", "1.5"]) == 1
    assert "category_quantile must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert run_command(job.main, ["--scorer", "laion:only-one-path", "--source", str(data),
                                  "--out", str(tmp_path / "y")]) == 1
    assert "expected laion:CLIP_FOLDER,HEAD_FILE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_laion_spec_scores_the_synthetic_domain(tmp_path):
    """The command with a real scorer spec (a tiny random CLIP and head) on the synthetic aesthetic domain."""
    from ernie_jax.data.aesthetic_shapes import render_scenes, write_image_folder

    clip_folder, head_file, reference = write_tiny_scorer(tmp_path / "scorer")
    scenes = render_scenes(5, seed=0, height=32, width=32)
    domain = write_image_folder(tmp_path / "domain", scenes)
    out = tmp_path / "domain.scored"
    argv = ["--scorer", f"laion:{clip_folder},{head_file}", "--source", str(domain), "--out", str(out),
            "--batch-size", "4"]
    assert run_command(job.main, argv) == 0
    source = open_source(out)
    expected = reference(scenes.images)
    scores = np.array([source[i]["aesthetic"] for i in range(len(source))])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert [source[i]["category"] for i in range(len(source))] == scenes.categories.tolist()
