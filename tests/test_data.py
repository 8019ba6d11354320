"""The data package: buckets, curriculum, category-weighted sampling, sources, the grain pipeline."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ernie_jax.data.buckets import (
    RELEASED_1MP,
    Bucket,
    as_buckets,
    assign_buckets,
    center_crop_box,
    crop_fraction,
    resize_and_crop,
    stage_buckets,
)
from ernie_jax.data.catalog import Catalog, scan_catalog, shard_indices
from ernie_jax.data.categories import SamplingConfig
from ernie_jax.data.curriculum import Curriculum, Stage, progressive_curriculum
from ernie_jax.data.pipeline import PipelineConfig, build_pipeline
from ernie_jax.data.sampler import BatchPlans, BucketSampler, build_stage_table
from ernie_jax.data.sources import (
    DEFAULT_CATEGORY,
    FolderSource,
    TfdsSource,
    decode_image,
    image_size,
)

TINY_BUCKETS = ((32, 32), (32, 48), (48, 32))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(rng, height, width) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def tiny_records(count: int, seed: int = 0) -> list[dict]:
    """Records of random sizes around the TINY_BUCKETS aspects, three categories, scores in [1, 5]."""
    rng = np.random.default_rng(seed)
    sizes = ((20, 20), (24, 36), (36, 24), (30, 40), (40, 28))
    return [{"image": png_bytes(random_image(rng, *sizes[i % len(sizes)])), "caption": f"caption {i}",
             "category": ("cat", "dog", "bird")[i % 3], "aesthetic": float(rng.uniform(1, 5))}
            for i in range(count)]


def tiny_curriculum(first_stage_steps: int | None = None) -> Curriculum:
    if first_stage_steps is None:
        return Curriculum((Stage(0, None, TINY_BUCKETS, 4),))
    return Curriculum((Stage(0, first_stage_steps, TINY_BUCKETS, 4),
                       Stage(first_stage_steps, None, ((48, 48), (48, 64), (64, 48)), 2)))


def caption_index(caption: str) -> int:
    return int(caption.split()[-1])


# --- buckets ------------------------------------------------------------------------------------------


def test_stage_tables_match_released_sizes_and_keep_pixel_count():
    assert stage_buckets(1024) == as_buckets(RELEASED_1MP)
    released_log_aspects = np.log([w / h for h, w in RELEASED_1MP])
    for side in (256, 512, 1024):
        buckets = stage_buckets(side)
        assert len(set(buckets)) == 7
        for bucket, reference_log_aspect in zip(buckets, released_log_aspects):
            assert bucket.height % 16 == 0 and bucket.width % 16 == 0
            assert abs(bucket.area / side**2 - 1) <= 0.05, (side, bucket)
            assert abs(np.log(bucket.aspect) - reference_log_aspect) < 0.03, (side, bucket)


def test_bucket_sizes_must_be_multiples_of_16():
    with pytest.raises(ValueError, match="1000x1024: height 1000"):
        Bucket(1000, 1024)
    with pytest.raises(ValueError, match="multiple of 16"):
        Stage(0, 10, ((32, 40),), 4)
    with pytest.raises(ValueError, match="stage side 1000"):
        stage_buckets(1000)


def test_assignment_picks_the_closest_aspect():
    buckets = as_buckets(RELEASED_1MP)
    heights = np.array([1080, 1920, 500, 1000, 1200, 3000])
    widths = np.array([1920, 1080, 500, 1500, 1600, 1000])
    assigned = [buckets[i] for i in assign_buckets(heights, widths, buckets)]
    assert assigned == [Bucket(768, 1376), Bucket(1376, 768), Bucket(1024, 1024), Bucket(848, 1264),
                        Bucket(896, 1200), Bucket(1376, 768)]
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(100, 4000, 500), rng.integers(100, 4000, 500)
    distance = np.abs(np.log(widths / heights)[:, None] - np.log([b.aspect for b in buckets])[None, :])
    chosen = distance[np.arange(500), assign_buckets(heights, widths, buckets)]
    assert np.all(chosen <= distance.min(axis=1))


def test_center_crop_keeps_the_middle_and_its_loss_is_bounded():
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, :32] = (255, 0, 0)
    image[:, 32:96] = (0, 255, 0)
    image[:, 96:] = (0, 0, 255)
    square = resize_and_crop(image, Bucket(32, 32))
    assert square.shape == (32, 32, 3)
    assert np.abs(square[:, 2:-2].astype(int) - (0, 255, 0)).max() <= 2
    assert np.abs(square.astype(int) - (0, 255, 0)).mean() < 3
    tall = resize_and_crop(image.transpose(1, 0, 2), Bucket(48, 32))
    assert tall.shape == (48, 32, 3)

    # The crop box's area loss is the formula's, and within the released aspect range it stays
    # below the loss halfway (in log aspect) between 1:1 and 896:1200, 1 - sqrt(896/1200).
    buckets = as_buckets(RELEASED_1MP)
    aspects = np.exp(np.linspace(np.log(768 / 1376), np.log(1376 / 768), 2001))
    heights, widths = np.full_like(aspects, 1000.0), 1000.0 * aspects
    chosen = [buckets[i] for i in assign_buckets(heights, widths, buckets)]
    losses = crop_fraction(heights, widths, [b.height for b in chosen], [b.width for b in chosen])
    for height, width, bucket, loss in list(zip(heights, widths, chosen, losses))[::100]:
        left, upper, right, lower = center_crop_box(height, width, bucket)
        assert abs(1 - (right - left) * (lower - upper) / (height * width) - loss) < 1e-9
    assert losses.max() <= 1 - np.sqrt(896 / 1200) + 1e-3
    assert losses.max() > 0.13


def test_crop_bound_drops_extreme_aspects_from_a_stage():
    catalog = Catalog(indices=np.arange(3), heights=np.array([100, 100, 100], np.int32),
                      widths=np.array([100, 200, 300], np.int32), categories=np.zeros(3, np.int32),
                      aesthetics=np.ones(3, np.float32), category_names=("a",), unreadable={})
    stage = Stage(0, None, RELEASED_1MP, 4)
    table = build_stage_table(catalog, stage, SamplingConfig(), 0.25, host_mean=lambda mass: mass)
    # 2:1 loses 1 - (1376/768)/2 = 10.4% to the 768x1376 bucket; 3:1 would lose 40%.
    assert table.record_buckets.tolist() == [0, 3, -1]
    assert table.num_dropped == 1 and table.probs[2] == 0


# --- curriculum ---------------------------------------------------------------------------------------


def test_curriculum_switches_stage_at_the_boundaries():
    curriculum = progressive_curriculum([100, 50, None], [8, 4, 2])
    names = {step: curriculum.stage_at(step).name for step in (0, 99, 100, 149, 150, 10**9)}
    assert names == {0: "256px", 99: "256px", 100: "512px", 149: "512px", 150: "1024px", 10**9: "1024px"}
    assert curriculum.stage_at(150).buckets == as_buckets(RELEASED_1MP)
    assert curriculum.total_steps is None

    data = build_pipeline(tiny_records(30), PipelineConfig(tiny_curriculum(first_stage_steps=3)),
                          shard_index=0, shard_count=1)
    batches = [data.dataset[step] for step in range(6)]
    assert [batch["stage"] for batch in batches] == [0, 0, 0, 1, 1, 1]
    assert [len(batch["captions"]) for batch in batches] == [4, 4, 4, 2, 2, 2]
    assert all(batch["bucket"] in TINY_BUCKETS for batch in batches[:3])
    assert all(batch["bucket"] in ((48, 48), (48, 64), (64, 48)) for batch in batches[3:])


@pytest.mark.parametrize("stages, message", [
    ((Stage(0, 10, TINY_BUCKETS, 4), Stage(12, None, TINY_BUCKETS, 4)), "gap between stage 0"),
    ((Stage(0, 10, TINY_BUCKETS, 4), Stage(8, None, TINY_BUCKETS, 4)), "overlap between stage 0"),
    ((Stage(0, None, TINY_BUCKETS, 4), Stage(10, 20, TINY_BUCKETS, 4)), "stage 0 is open-ended"),
    ((Stage(5, 10, TINY_BUCKETS, 4),), "starts at step 5"),
])
def test_curriculum_rejects_bad_ranges(stages, message):
    with pytest.raises(ValueError, match=message):
        Curriculum(stages)


def test_step_past_a_finite_curriculum_is_an_error():
    with pytest.raises(ValueError, match="step 10 is outside"):
        Curriculum((Stage(0, 10, TINY_BUCKETS, 4),)).stage_at(10)


# --- category-weighted sampling -----------------------------------------------------------------------


def synthetic_catalog(seed: int = 0) -> Catalog:
    """Four categories of 400/120/40/12 records with different mean scores and different aspect mixes.

    Category and bucket are correlated on purpose: drawing the bucket with the wrong probability
    then shows up in the category frequencies.
    """
    rng = np.random.default_rng(seed)
    counts, means = [400, 120, 40, 12], [2.0, 3.0, 4.0, 6.0]
    aspect_mix = [[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]]
    categories = np.repeat(np.arange(4), counts).astype(np.int32)
    aesthetics = np.concatenate([rng.uniform(m - 1, m + 1, n) for m, n in zip(means, counts)]).astype(np.float32)
    size_choice = np.concatenate([rng.choice(3, n, p=mix) for mix, n in zip(aspect_mix, counts)])
    sizes = np.array([(32, 32), (32, 48), (48, 32)])[size_choice]
    return Catalog(indices=np.arange(categories.size), heights=sizes[:, 0].astype(np.int32),
                   widths=sizes[:, 1].astype(np.int32), categories=categories, aesthetics=aesthetics,
                   category_names=("a", "b", "c", "d"), unreadable={})


def draw_rows(catalog: Catalog, sampling: SamplingConfig, steps: int, batch_size: int = 1,
              host_mean=lambda mass: mass) -> np.ndarray:
    """Catalog rows the sampler draws over `steps` steps (no decoding). int64 [steps * batch_size].

    With batch_size 1 the draws are independent, so their counts are exactly multinomial.
    """
    curriculum = Curriculum((Stage(0, None, TINY_BUCKETS, batch_size),))
    tables = (build_stage_table(catalog, curriculum.stages[0], sampling, 0.25, host_mean),)
    plans = BatchPlans(BucketSampler(curriculum, tables, seed=1, shard_index=0, shard_count=1))
    return np.concatenate([plans[step]["rows"] for step in range(steps)])


def expected_category_probs(catalog: Catalog, formula: str, tau: float) -> np.ndarray:
    counts = np.bincount(catalog.categories).astype(np.float64)
    means = np.bincount(catalog.categories, weights=catalog.aesthetics.astype(np.float64)) / counts
    weights = {"uniform": np.ones(4), "count": counts, "count_x_aesthetic": counts * means,
               "tempered": (counts * means) ** tau, "count_power_exp_aesthetic": counts**tau * np.exp(means)}[formula]
    return weights / weights.sum()


def category_z_scores(catalog: Catalog, rows: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|realised - expected| category frequency in binomial standard deviations. [K]"""
    frequencies = np.bincount(catalog.categories[rows], minlength=expected.size) / rows.size
    return np.abs(frequencies - expected) / np.sqrt(expected * (1 - expected) / rows.size)


@pytest.mark.parametrize("formula", ["count_x_aesthetic", "tempered", "count_power_exp_aesthetic"])
def test_category_frequencies_match_the_formula(formula):
    catalog = synthetic_catalog()
    rows = draw_rows(catalog, SamplingConfig(category_formula=formula, tau=0.5), steps=20000)
    z_scores = category_z_scores(catalog, rows, expected_category_probs(catalog, formula, tau=0.5))
    assert np.all(z_scores <= 4), z_scores


def test_bucket_draw_carries_the_mixture_mass():
    # Drawing buckets uniformly instead of by their mass under the mixture biases the categories,
    # because the synthetic categories prefer different aspects; the frequency test detects it.
    catalog = synthetic_catalog()
    rows = draw_rows(catalog, SamplingConfig(category_formula="tempered", tau=0.5), steps=20000,
                     host_mean=np.ones_like)
    assert category_z_scores(catalog, rows, expected_category_probs(catalog, "tempered", tau=0.5)).max() > 10


def test_records_within_a_category_follow_the_aesthetic_softmax():
    catalog = synthetic_catalog()
    sampling = SamplingConfig(category_formula="uniform", within_category="softmax", aesthetic_temperature=0.5)
    rows = draw_rows(catalog, sampling, steps=5000, batch_size=4)
    smallest = np.flatnonzero(catalog.categories == 3)
    in_category = rows[catalog.categories[rows] == 3]
    frequencies = np.array([np.sum(in_category == row) for row in smallest]) / in_category.size
    expected = np.exp(catalog.aesthetics[smallest] / 0.5)
    expected /= expected.sum()
    sigma = np.sqrt(expected * (1 - expected) / in_category.size)
    assert np.all(np.abs(frequencies - expected) <= 4 * sigma), (frequencies, expected)


def test_aesthetic_floor_and_positive_score_requirement():
    catalog = synthetic_catalog()
    rows = draw_rows(catalog, SamplingConfig(min_aesthetic=3.0), steps=200)
    assert catalog.aesthetics[rows].min() >= 3.0
    negative = Catalog(**{**catalog.__dict__, "aesthetics": catalog.aesthetics - 10})
    with pytest.raises(ValueError, match="needs positive mean aesthetic"):
        draw_rows(negative, SamplingConfig(category_formula="count_x_aesthetic"), steps=1)
    with pytest.raises(ValueError, match="category_formula 'sqrt'"):
        SamplingConfig(category_formula="sqrt")


def test_category_scales_leave_out_and_reweight_named_categories():
    # A domain expert trains on one category: scale 0 leaves a category out, others rescale its weight.
    catalog = synthetic_catalog()
    sampling = SamplingConfig(category_formula="uniform", category_scales=ml_collections.ConfigDict({"a": 0.0,
                                                                                                       "c": 3.0}))
    rows = draw_rows(catalog, sampling, steps=5000)
    assert not np.any(catalog.categories[rows] == 0)
    expected = np.array([1.0, 3.0, 1.0]) / 5  # of b, c and d
    assert np.all(category_z_scores(catalog, rows, np.r_[0.5, expected])[1:] <= 4)  # (a's 0.5: no 0 / 0)
    with pytest.raises(ValueError, match=r"names \['txt'\], which the data does not have"):
        draw_rows(catalog, SamplingConfig(category_scales={"txt": 0.0}), steps=1)
    with pytest.raises(ValueError, match="leave no category"):
        draw_rows(catalog, SamplingConfig(category_scales=dict.fromkeys("abcd", 0.0)), steps=1)
    with pytest.raises(ValueError, match="must be non-negative"):
        SamplingConfig(category_scales={"a": -1.0})


# --- sources and corrupt records ----------------------------------------------------------------------


def write_folder(root, records) -> None:
    for index, record in enumerate(records):
        (root / f"img{index:03d}.png").write_bytes(record["image"])
        (root / f"img{index:03d}.txt").write_text(record["caption"])
        (root / f"img{index:03d}.json").write_text(json.dumps({"category": record["category"],
                                                              "aesthetic": record["aesthetic"]}))


def test_folder_source_reads_metadata_and_defaults(tmp_path):
    rng = np.random.default_rng(0)
    image = random_image(rng, 20, 30)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.PNG").write_bytes(png_bytes(image))
    (tmp_path / "sub" / "a.txt").write_text("  a red square \n")
    (tmp_path / "b.png").write_bytes(png_bytes(image))
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "b.json").write_text(json.dumps({"category": 7, "aesthetic": 4.0}))
    (tmp_path / "notes.md").write_text("not an image")
    source = FolderSource(tmp_path)
    assert len(source) == 2
    assert source[1]["caption"] == "a red square"
    np.testing.assert_array_equal(decode_image(source[1]["image"]), image)
    catalog = scan_catalog(source, range(len(source)))
    assert catalog.category_names == ("7", DEFAULT_CATEGORY)
    assert catalog.categories.tolist() == [0, 1]
    assert catalog.aesthetics.tolist() == [4.0, 4.0]  # the missing score gets the known mean
    assert (catalog.heights.tolist(), catalog.widths.tolist()) == ([20, 20], [30, 30])


def test_exif_orientation_is_applied_to_size_and_pixels():
    image = random_image(np.random.default_rng(0), 20, 30)
    pil_image = Image.fromarray(image)
    exif = pil_image.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buffer = io.BytesIO()
    pil_image.save(buffer, format="PNG", exif=exif.tobytes())
    assert image_size(buffer.getvalue()) == (30, 20)
    np.testing.assert_array_equal(decode_image(buffer.getvalue()), np.rot90(image, k=-1))


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    records = tiny_records(10)
    write_folder(tmp_path, records)
    (tmp_path / "img000.png").write_bytes(b"definitely not an image")       # unreadable header: scan
    (tmp_path / "img001.txt").unlink()                                       # no caption: scan
    (tmp_path / "img002.json").write_text("[1, 2]")                         # metadata not an object: scan
    truncated = records[3]["image"]
    (tmp_path / "img003.png").write_bytes(truncated[: len(truncated) // 2])  # header fine, body cut: load
    source = FolderSource(tmp_path)
    data = build_pipeline(source, PipelineConfig(tiny_curriculum(), max_crop_fraction=0.5),
                          shard_index=0, shard_count=1)
    (tmp_path / "img004.png").unlink()                                       # vanished after the scan: load
    assert data.stats.scan_skipped == {"UnidentifiedImageError": 1, "FileNotFoundError": 1, "ValueError": 1}
    assert len(data.catalog) == 7

    iterator = data.iterator()
    batches = [next(iterator) for _ in range(40)]
    seen = {caption_index(caption) for batch in batches for caption in batch["captions"]}
    assert seen == {5, 6, 7, 8, 9}
    assert all(batch["images"].shape[0] == 4 for batch in batches)
    skipped = data.stats.load_skipped
    assert set(skipped) == {"OSError", "FileNotFoundError"}, skipped
    assert sum(batch["num_skipped"] for batch in batches) == sum(skipped.values())
    assert data.stats.summary()["data/skipped_at_load"] == sum(skipped.values())
    all_categories = np.concatenate([batch["category"] for batch in batches])
    np.testing.assert_array_equal(data.stats.category_counts, np.bincount(all_categories, minlength=3))
    assert sum(data.stats.category_summary().values()) == 160


def test_a_batch_that_cannot_be_filled_raises(tmp_path):
    write_folder(tmp_path, tiny_records(4))
    data = build_pipeline(FolderSource(tmp_path), PipelineConfig(tiny_curriculum(), max_skips_per_batch=10),
                          shard_index=0, shard_count=1)
    for path in tmp_path.glob("*.png"):
        path.unlink()
    with pytest.raises(RuntimeError, match="more than 10 records failed to load"):
        data.dataset[0]


def test_tfds_arrayrecord_source(tmp_path):
    from ernie_jax.data.tfds_io import write_tfds_dataset

    rng = np.random.default_rng(0)
    arrays = [random_image(rng, 24, 36), random_image(rng, 32, 32)]
    records = [{"image": png_bytes(arrays[0]), "caption": "first", "category": 3, "aesthetic": 2.5},
               {"image": arrays[1], "caption": "second"},
               {"image": b"garbage", "caption": "broken", "category": "x", "aesthetic": 1.0}]
    folder = write_tfds_dataset(tmp_path, {"train": records})
    source = TfdsSource(folder)
    assert len(source) == 3
    for index, array in enumerate(arrays):
        np.testing.assert_array_equal(decode_image(source[index]["image"]), array)
    catalog = scan_catalog(source, range(len(source)))
    assert catalog.unreadable == {"UnidentifiedImageError": 1}
    assert [catalog.category_names[c] for c in catalog.categories] == ["3", DEFAULT_CATEGORY]
    assert catalog.aesthetics.tolist() == [2.5, 2.5]
    catalog.save(tmp_path / "catalog.npz")
    loaded = Catalog.load(tmp_path / "catalog.npz")
    for field in ("indices", "heights", "widths", "categories", "aesthetics"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(catalog, field))
    assert (loaded.category_names, loaded.unreadable) == (catalog.category_names, catalog.unreadable)
    data = build_pipeline(source, PipelineConfig(tiny_curriculum()), shard_index=0, shard_count=1, catalog=loaded)
    with pytest.raises(ValueError, match="not all in shard 1 of 2"):
        build_pipeline(source, PipelineConfig(tiny_curriculum()), shard_index=1, shard_count=2, catalog=loaded)
    batch = data.dataset[0]
    assert batch["images"].dtype == np.uint8 and batch["images"].shape[1:3] == batch["bucket"]
    assert set(batch["captions"]) <= {"first", "second"}


# --- sharding, batching, checkpointing ----------------------------------------------------------------


def test_host_shards_are_disjoint_and_cover_and_agree_on_buckets():
    shards = [shard_indices(11, index, 3) for index in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(11))

    records = tiny_records(40)
    config = PipelineConfig(Curriculum((Stage(0, None, TINY_BUCKETS, 8),)))
    hosts = [build_pipeline(records, config, shard_index=index, shard_count=2,
                            host_mean=lambda mass: np.ones_like(mass)) for index in range(2)]
    for index, host in enumerate(hosts):
        assert set(host.catalog.indices.tolist()) == set(range(index, 40, 2))
    for step in range(10):
        batches = [host.dataset[step] for host in hosts]
        assert batches[0]["bucket"] == batches[1]["bucket"]
        for index, batch in enumerate(batches):
            assert len(batch["captions"]) == 4
            assert all(caption_index(caption) % 2 == index for caption in batch["captions"])
    with pytest.raises(ValueError, match="batch_size 8 is not divisible by the 3 hosts"):
        build_pipeline(records, config, shard_index=0, shard_count=3)


def test_two_jax_processes_agree_on_buckets_and_read_disjoint_shards(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = Path(__file__).resolve().parent / "workers" / "data_hosts.py"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(worker.parents[2]))
    outputs = [tmp_path / f"process{index}.json" for index in range(2)]
    processes = [subprocess.Popen([sys.executable, str(worker), str(port), str(index), str(outputs[index])],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                 for index in range(2)]
    try:
        errors = [process.communicate(timeout=300)[1].decode()[-2000:] for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert [process.returncode for process in processes] == [0, 0], errors
    hosts = [json.loads(path.read_text()) for path in outputs]
    assert [host["shard"] for host in hosts] == [[0, 2], [1, 2]]
    assert hosts[0]["local_mass"] != hosts[1]["local_mass"]  # the agreement is needed
    assert hosts[0]["bucket_probs"] == hosts[1]["bucket_probs"]
    assert hosts[0]["buckets"] == hosts[1]["buckets"]
    for shard, host in enumerate(hosts):
        assert all(index % 2 == shard for batch in host["indices"] for index in batch)
        assert all(len(batch) == 4 for batch in host["indices"])


def test_every_batch_is_one_bucket_holding_its_records():
    records = tiny_records(60)
    data = build_pipeline(records, PipelineConfig(tiny_curriculum(), seed=3), shard_index=0, shard_count=1)
    table = data.tables[0]
    row_of_index = {int(index): row for row, index in enumerate(data.catalog.indices)}
    buckets_seen = []
    for step in range(120):
        batch = data.dataset[step]
        height, width = batch["bucket"]
        assert batch["images"].shape == (4, height, width, 3)
        rows = [row_of_index[caption_index(caption)] for caption in batch["captions"]]
        assert {TINY_BUCKETS[table.record_buckets[row]] for row in rows} == {(height, width)}
        np.testing.assert_array_equal(batch["category"], data.catalog.categories[rows])
        buckets_seen.append(TINY_BUCKETS.index((height, width)))
    frequencies = np.bincount(buckets_seen, minlength=3) / len(buckets_seen)
    sigma = np.sqrt(table.bucket_probs * (1 - table.bucket_probs) / len(buckets_seen))
    assert np.all(np.abs(frequencies - table.bucket_probs) <= 4 * sigma), (frequencies, table.bucket_probs)


def test_iterator_state_round_trip_is_exact():
    records = tiny_records(30)
    config = PipelineConfig(tiny_curriculum(first_stage_steps=6), seed=5)
    iterator = build_pipeline(records, config, shard_index=0, shard_count=1).iterator()
    for _ in range(4):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]

    resumed = build_pipeline(records, config, shard_index=0, shard_count=1).iterator()
    resumed.set_state(state)
    actual = [next(resumed) for _ in range(5)]
    assert [batch["step"] for batch in actual] == [4, 5, 6, 7, 8]
    for got, want in zip(actual, expected):
        assert got["bucket"] == want["bucket"]
        np.testing.assert_array_equal(got["images"], want["images"])
        np.testing.assert_array_equal(got["captions"], want["captions"])
        np.testing.assert_array_equal(got["aesthetic"], want["aesthetic"])
    other_seed = build_pipeline(records, PipelineConfig(config.curriculum, seed=6), shard_index=0, shard_count=1)
    assert not np.array_equal(other_seed.dataset[4]["captions"], expected[0]["captions"])
