"""Preference data for DPO: manifests, precomputed preference folders, their batches, pairs the model makes
itself, and the shapes reward."""

from __future__ import annotations

import base64
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conversions.common import run_command
from ernie_jax.data import shapes
from ernie_jax.data.buckets import as_buckets, assign_buckets, resize_and_crop
from ernie_jax.data.curriculum import Curriculum, Stage
from ernie_jax.data.generated_pairs import generate_pairs, select_pairs, shapes_prompts
from ernie_jax.data.pipeline import PipelineConfig
from ernie_jax.data.precompute import PrecomputeConfig, model_fingerprint
from ernie_jax.data.preferences import (
    PreferenceSource,
    build_preference_pipeline,
    main,
    precompute_preferences,
    read_manifest,
)
from ernie_jax.data.prompt_styles import StyleMix
from ernie_jax.data.sources import decode_image
from ernie_jax.evaluation.rewards import load_reward, shapes_reward
from ernie_jax.models.vae import encode_to_packed_latents
from tests.conftest import relative_error
from tests.test_data import png_bytes, random_image

BUCKETS = ((32, 32), (32, 48), (48, 32))
MAX_TEXT_LEN = 12
TIE_WEIGHT = 0.5
# (label_0, size of image 0, size of image 1, how the images are given); line 4's image 1 is beyond the
# crop bound, line 5's image 0 does not decode, line 3 is a tie. Two buckets are used (each compiles the VAE).
ROWS = ((1, (24, 36), (30, 40), "paths"), (0, (20, 20), (24, 20), "base64"), (0.5, (24, 36), (28, 40), "paths"),
        (1, (20, 20), (16, 80), "paths"), (1, (24, 36), (24, 36), "broken"), (0, (22, 20), (20, 20), "base64"))


def caption_of(line: int) -> str:
    return f"{line} a red circle and a blue square on white ground with soft light and long shadows"[:20 + 9 * line]


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    rng = np.random.default_rng(0)
    lines = []
    for line, (label, size_0, size_1, given) in enumerate(ROWS, start=1):
        row = {"caption": caption_of(line), "label_0": label}
        for number, size in enumerate((size_0, size_1)):
            data = b"not an image" if given == "broken" and number == 0 else png_bytes(random_image(rng, *size))
            if given == "base64":
                row[f"jpg_{number}"] = base64.b64encode(data).decode()
            else:
                (root / "images").mkdir(exist_ok=True)
                (root / "images" / f"{line}_{number}.png").write_bytes(data)
                row[f"image_{number}"] = f"images/{line}_{number}.png"
        lines.append(json.dumps(row))
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line is skipped
    return path


def manifest_line(line: int) -> int:
    """The file line of ROWS[line - 1] (a blank line follows the second)."""
    return line + (line > 2)


def test_manifest_drops_ties_or_keeps_both_orders_at_half_weight(manifest_path):
    dropped = read_manifest(manifest_path)
    assert (dropped.rows, dropped.ties_dropped, dropped.ties_kept) == (6, 1, 0)
    assert [(pair.line, pair.chosen, pair.weight) for pair in dropped.pairs] == [
        (1, 0, 1.0), (2, 1, 1.0), (5, 0, 1.0), (6, 0, 1.0), (7, 1, 1.0)]
    kept = read_manifest(manifest_path.parent, tie_weight=TIE_WEIGHT)  # the folder reads its .jsonl files
    assert (kept.rows, kept.ties_dropped, kept.ties_kept) == (6, 0, 1)
    assert [(pair.line, pair.chosen, pair.weight) for pair in kept.pairs] == [
        (1, 0, 1.0), (2, 1, 1.0), (4, 0, 0.25), (4, 1, 0.25), (5, 0, 1.0), (6, 0, 1.0), (7, 1, 1.0)]
    assert kept.pairs[2].images == kept.pairs[3].images == (manifest_path.parent / "images/3_0.png",
                                                            manifest_path.parent / "images/3_1.png")


@pytest.mark.parametrize("row, message", [
    ('{"caption": "x", "image_0": "a.png", "image_1": "a.png", "label_0": 2}', "label_0 must be 1"),
    ('{"caption": "x", "image_0": "a.png", "image_1": "a.png", "label_0": true}', "label_0 must be 1"),
    ('{"image_0": "a.png", "image_1": "a.png", "label_0": 1}', "caption must be a string"),
    ('{"caption": "x", "image_0": "a.png", "image_1": "missing.png", "label_0": 1}', "image_1 .* is not a file"),
    ('{"caption": "x", "image_0": "a.png", "label_0": 1}', "give exactly one of image_1"),
    ('{"caption": "x", "jpg_0": "@@@", "image_1": "a.png", "label_0": 0}', "jpg_0 is not valid base64"),
    ('{"caption": "x", "image_0": "a.png"', "not a JSON object"),
    ('["x", "a.png", "a.png", 1]', "expected a JSON object"),
])
def test_bad_manifest_records_are_errors_naming_the_line(tmp_path, row, message):
    (tmp_path / "a.png").write_bytes(png_bytes(random_image(np.random.default_rng(1), 8, 8)))
    good = '{"caption": "x", "image_0": "a.png", "image_1": "a.png", "label_0": 0.5}'
    path = tmp_path / "m.jsonl"
    path.write_text(f"{good}\n{good}\n{row}\n{good}\n")
    with pytest.raises(ValueError, match=f"m.jsonl:3: {message}"):
        read_manifest(path, tie_weight=1.0)
    path.write_text(f"{good}\n")
    with pytest.raises(ValueError, match="no preference pair .* 1 of them ties, dropped"):
        read_manifest(path)
    with pytest.raises(ValueError, match="tie_weight must be positive"):
        read_manifest(path, tie_weight=0.0)


@pytest.fixture(scope="module")
def preference_folder(random_pipeline_folder, manifest_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "preferences"
    argv = ["--model", str(random_pipeline_folder), "--manifest", str(manifest_path), "--out", str(out),
            "--buckets", ",".join(f"{h}x{w}" for h, w in BUCKETS), "--max-text-len", str(MAX_TEXT_LEN),
            "--batch-size", "2", "--shard-size", "3", "--tie-weight", str(TIE_WEIGHT)]
    assert run_command(main, argv) == 0
    return out


@pytest.fixture(scope="module")
def reference_pipeline(random_pipeline_folder):
    from ernie_jax.pipeline import ErnieImagePipeline

    return ErnieImagePipeline.from_pretrained(random_pipeline_folder, dtype="float32")


def manifest_images(manifest_path, line: int) -> list[np.ndarray]:
    """The two images of ROWS line `line`, decoded independently of the tool."""
    row = json.loads(manifest_path.read_text().splitlines()[manifest_line(line) - 1])
    if "jpg_0" in row:
        return [decode_image(base64.b64decode(row[f"jpg_{n}"])) for n in (0, 1)]
    return [decode_image((manifest_path.parent / row[f"image_{n}"]).read_bytes()) for n in (0, 1)]


def test_precomputed_pairs_equal_the_frozen_encoders_on_the_same_images(preference_folder, manifest_path,
                                                                         reference_pipeline):
    source = PreferenceSource(preference_folder)
    metadata = json.loads((preference_folder / "metadata.json").read_text())
    assert metadata["skipped"] == {"unreadable": {"UnidentifiedImageError": 1}, "crop": 1}
    assert metadata["pairs"] == {"manifest_rows": 6, "ties_dropped": 0, "ties_kept": 1}
    assert len(source) == metadata["records"] == 5 and [f["records"] for f in metadata["files"]] == [3, 2]
    buckets = as_buckets(BUCKETS)
    encode = nnx.jit(encode_to_packed_latents)
    latent_errors, text_errors, seen = [], [], []
    for position in range(len(source)):
        record = source[position]
        line = next(row for row in range(1, 7) if manifest_line(row) == record["origin"]["line"])
        label, chosen = ROWS[line - 1][0], record["origin"]["chosen"]
        seen.append((line, chosen))
        assert chosen == (0 if label == 1 else 1) or label == 0.5
        assert record["weight"] == (TIE_WEIGHT / 2 if label == 0.5 else 1.0)
        assert source.index["pair_weight"][position] == record["weight"]
        images = manifest_images(manifest_path, line)
        bucket = buckets[assign_buckets([images[0].shape[0]], [images[0].shape[1]], buckets)[0]]
        assert record["bucket"] == [bucket.height, bucket.width]
        pixels = np.stack([resize_and_crop(images[n], bucket) for n in (chosen, 1 - chosen)])
        pixels = (pixels.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(0, 3, 1, 2)
        expected = np.asarray(encode(reference_pipeline.vae, jnp.asarray(pixels)))
        assert record["latents"].shape == (2, 128, bucket.height // 16, bucket.width // 16)
        latent_errors.append(relative_error(record["latents"], expected))
        text = np.asarray(reference_pipeline.encode_prompt([caption_of(line)])[0])[:MAX_TEXT_LEN]
        assert record["caption"] == caption_of(line) and record["text"].shape == text.shape
        text_errors.append(relative_error(record["text"], text))
    assert sorted(seen) == [(1, 0), (2, 1), (3, 0), (3, 1), (6, 1)]
    # XLA's CPU convolutions round differently for the tool's batch of 2 and this one (as in test_precompute).
    assert max(latent_errors) <= 1e-5, latent_errors
    assert max(text_errors) <= 1e-6, text_errors


def batches(data, count: int, state=None) -> list[dict]:
    iterator = data.iterator()
    if state is not None:
        iterator.set_state(state)
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_preference_batches_are_the_records_deterministic_and_resumable(preference_folder):
    source = PreferenceSource(preference_folder)
    config = PipelineConfig(Curriculum((Stage(0, None, BUCKETS, 4),)), seed=3)
    data = build_preference_pipeline(source, config, shard_index=0, shard_count=1)
    made = batches(data, 6)
    records = [source[position] for position in range(len(source))]
    for batch in made:
        height, width = batch["bucket"]
        assert batch["latents_chosen"].shape == batch["latents_rejected"].shape == (4, 128, height // 16, width // 16)
        assert batch["text_bth"].shape == (4, MAX_TEXT_LEN, 64) and batch["text_bth"].dtype == np.float32
        assert batch["text_lens"].dtype == np.int32 and batch["pair_weights"].dtype == np.float32
        assert batch["caption_style"].tolist() == [0] * 4  # "dense": pairs keep their captions
        for i in range(4):
            matches = [r for r in records if r["caption"] == batch["captions"][i]
                       and np.array_equal(r["latents"][0], batch["latents_chosen"][i])]
            assert len(matches) == 1
            record = matches[0]
            np.testing.assert_array_equal(batch["latents_rejected"][i], record["latents"][1])
            assert batch["pair_weights"][i] == record["weight"]
            length = batch["text_lens"][i]
            assert length == record["text"].shape[0]
            np.testing.assert_array_equal(batch["text_bth"][i, :length], record["text"])
            assert not batch["text_bth"][i, length:].any()
    assert {float(w) for batch in made for w in batch["pair_weights"]} == {1.0, TIE_WEIGHT / 2}

    assert_same_batches(made, batches(build_preference_pipeline(source, config, shard_index=0, shard_count=1), 6))
    iterator = data.iterator()
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    assert_same_batches(made[3:], batches(data, 3, state))
    other_seed = build_preference_pipeline(source, PipelineConfig(config.curriculum, seed=4), shard_index=0,
                                           shard_count=1)
    assert [b["captions"].tolist() for b in made] != [b["captions"].tolist() for b in batches(other_seed, 6)]


def test_preference_batches_are_sharded_by_host(preference_folder):
    source = PreferenceSource(preference_folder)
    records = [source[position] for position in range(len(source))]
    config = PipelineConfig(Curriculum((Stage(0, None, BUCKETS, 4),)), seed=3)
    # Both hosts hold pairs of the same two buckets, so this stands in for the mean over hosts.
    hosts = [build_preference_pipeline(source, config, shard_index=index, shard_count=2,
                                       host_mean=lambda mass: (mass > 0).astype(np.float64)) for index in range(2)]
    for index, host in enumerate(hosts):
        assert set(host.catalog.indices.tolist()) == {r["source_index"] for r in records} & set(range(index, 7, 2))
    for step in range(6):
        made = [host.dataset[step] for host in hosts]
        assert made[0]["bucket"] == made[1]["bucket"]
        for index, batch in enumerate(made):
            assert batch["latents_chosen"].shape[0] == 2
            for latents in batch["latents_chosen"]:
                (record,) = [r for r in records if np.array_equal(r["latents"][0], latents)]
                assert record["source_index"] % 2 == index


def test_preference_pipeline_refuses_other_sources(preference_folder, tmp_path):
    from ernie_jax.data.precomputed import PrecomputedSource

    with pytest.raises(ValueError, match="format 'ernie_jax.preferences' version 1, expected 'ernie_jax.precomputed'"):
        PrecomputedSource(preference_folder)
    with pytest.raises(ValueError, match="needs PreferenceSources"):
        build_preference_pipeline([], PipelineConfig(Curriculum((Stage(0, None, BUCKETS, 4),))))


def test_preference_captions_are_never_restyled(preference_folder, manifest_path, tmp_path):
    styled = PipelineConfig(Curriculum((Stage(0, None, BUCKETS, 4),)), caption_styles=StyleMix())
    with pytest.raises(ValueError, match="keep the captions their images were judged against"):
        build_preference_pipeline(PreferenceSource(preference_folder), styled, shard_index=0, shard_count=1)
    # Checked before any encoder runs (there is none here) and before anything is written.
    with pytest.raises(ValueError, match="keep the captions their images were judged against"):
        precompute_preferences(None, read_manifest(manifest_path), tmp_path / "styled",
                               PrecomputeConfig(BUCKETS, caption_styles=StyleMix()))
    assert not (tmp_path / "styled").exists()


@pytest.fixture(scope="module")
def parquet_manifest(manifest_path, tmp_path_factory):
    """ROWS as Pick-a-Pic's Parquet layout: the JSONL manifest's paths in image_k, its bytes in binary jpg_k
    columns (null where the row has a path), row groups of two rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in manifest_path.read_text().splitlines() if line.strip()]
    columns = {"caption": [row["caption"] for row in rows], "label_0": [float(row["label_0"]) for row in rows]}
    for number in (0, 1):
        columns[f"image_{number}"] = [None if "jpg_0" in row else str(manifest_path.parent / row[f"image_{number}"])
                                      for row in rows]
        columns[f"jpg_{number}"] = pa.array([base64.b64decode(row[f"jpg_{number}"]) if "jpg_0" in row else None
                                             for row in rows], pa.binary())
    columns["user_id"] = list(range(len(rows)))  # a column of Pick-a-Pic's that is not read
    path = tmp_path_factory.mktemp("parquet") / "pairs.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


def test_parquet_manifest_gives_the_jsonl_pairs_and_reads_bytes_on_demand(manifest_path, parquet_manifest):
    from ernie_jax.data.preferences import ParquetCell

    jsonl, parquet = (read_manifest(path, tie_weight=TIE_WEIGHT) for path in (manifest_path, parquet_manifest))
    assert (parquet.rows, parquet.ties_kept) == (jsonl.rows, jsonl.ties_kept) == (6, 1)
    assert [(pair.line, pair.chosen, pair.weight) for pair in parquet.pairs] == [
        (1, 0, 1.0), (2, 1, 1.0), (3, 0, 0.25), (3, 1, 0.25), (4, 0, 1.0), (5, 0, 1.0), (6, 1, 1.0)]
    for ours, theirs in zip(parquet.pairs, jsonl.pairs, strict=True):
        assert ours.caption == theirs.caption
        for image, expected in zip(ours.images, theirs.images, strict=True):
            if isinstance(expected, bytes):  # rows 2, 5, 6 (bytes, across all three row groups)
                assert isinstance(image, ParquetCell) and image.read_bytes() == expected
            else:
                assert image == expected
    with pytest.raises(ValueError, match=r"pairs.parquet: row 3: jpg_1 holds no image bytes"):
        ParquetCell(str(parquet_manifest), 2, "jpg_1").read_bytes()


def test_parquet_pairs_prepare_to_the_jsonl_pairs_pixels(manifest_path, parquet_manifest):
    """What precompute encodes of each pair (`_prepare_pair`: decoded, bucketed, cropped; or why it is skipped)
    is the same from the Parquet manifest as from the JSONL one; the rest of precompute never sees the manifest."""
    from ernie_jax.data.precompute import CROP_SKIP
    from ernie_jax.data.preferences import _prepare_pair

    buckets = as_buckets(BUCKETS)
    jsonl, parquet = (read_manifest(path, tie_weight=TIE_WEIGHT).pairs for path in (manifest_path, parquet_manifest))
    outcomes = []
    for index in range(len(jsonl)):
        ours, theirs = (_prepare_pair(pairs, buckets, 0.25, index) for pairs in (parquet, jsonl))
        outcomes.append(ours if isinstance(ours, str) else "pair")
        if isinstance(theirs, str):
            assert ours == theirs
            continue
        assert (ours.bucket_index, ours.image_size) == (theirs.bucket_index, theirs.image_size)
        np.testing.assert_array_equal(ours.chosen, theirs.chosen)
        np.testing.assert_array_equal(ours.rejected, theirs.rejected)
    # As the JSONL folder's metadata counts them: one image that does not decode, one pair beyond the crop bound.
    assert sorted(outcomes) == sorted(["pair"] * 5 + ["UnidentifiedImageError", CROP_SKIP])


@pytest.mark.parametrize("drop, message", [
    ("caption", "no 'caption' column"), ("label_0", "no 'label_0' column"),
    (("image_1", "jpg_1"), "no image_1 \\(paths\\) or jpg_1 \\(bytes\\) column"),
])
def test_parquet_manifest_without_a_column_is_one_error(parquet_manifest, tmp_path, drop, message):
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_manifest)
    pq.write_table(table.drop_columns(list(drop) if isinstance(drop, tuple) else [drop]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=f"bad.parquet: {message}"):
        read_manifest(tmp_path / "bad.parquet")


def test_parquet_manifest_bad_label_names_the_row_and_folders_read_both_kinds(parquet_manifest, manifest_path,
                                                                             tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_manifest)
    labels = table.column("label_0").to_pylist()
    labels[3] = 2.0
    pq.write_table(table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(labels)),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: row 4: label_0 must be 1"):
        read_manifest(tmp_path / "bad.parquet")
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "a.jsonl").write_text(manifest_path.read_text().replace('"images/', f'"{manifest_path.parent}/images/'))
    (folder / "b.parquet").write_bytes(parquet_manifest.read_bytes())
    (folder / "notes.txt").write_text("not a manifest")
    both = read_manifest(folder)
    assert both.rows == 12 and [pair.file for pair in both.pairs] == [str(folder / "a.jsonl")] * 5 + [
        str(folder / "b.parquet")] * 5
    with pytest.raises(ValueError, match="a manifest file is .jsonl or .parquet"):
        read_manifest(folder / "notes.txt")


def test_select_pairs_best_worst_and_margin():
    rewards = np.array([0.1, 0.5, 0.3, 0.5])
    assert select_pairs(rewards, "best-worst") == [(1, 0)]
    assert select_pairs(rewards, "best-worst", margin=0.4) == []
    assert select_pairs(rewards, "margin", margin=0.15) == [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)]
    assert select_pairs(rewards, "margin", margin=0.3) == [(1, 0), (3, 0)]
    with pytest.raises(ValueError, match="selection 'best' is not one of"):
        select_pairs(rewards, "best")


def mean_brightness(images, prompts):
    """A deterministic fake reward of the images alone."""
    assert images.dtype == np.uint8 and images.ndim == 4 and len(prompts) == len(images)
    return images.astype(np.float64).mean(axis=(1, 2, 3))


GENERATION = dict(samples_per_prompt=3, height=32, width=32, num_inference_steps=2, guidance_scale=2.0, seed=5,
                  max_text_len=MAX_TEXT_LEN, progress=False)
PROMPTS = ["a red circle at the top", "two blue squares at the left and the right"]


def test_generated_pairs_keep_the_best_and_worst_samples_and_the_pipelines_latents(reference_pipeline, tmp_path):
    metadata = generate_pairs(reference_pipeline, PROMPTS, mean_brightness, tmp_path / "best", **GENERATION)
    assert metadata["pairs"]["prompts_without_pair"] == 0 and metadata["max_crop_fraction"] is None
    source = PreferenceSource(tmp_path / "best")
    assert len(source) == 2
    settings = dict(height=32, width=32, num_inference_steps=2, guidance_scale=2.0, output_type="latent", use_pe=False)
    for position in range(len(source)):
        record = source[position]
        origin = record["origin"]
        prompt_index = origin["prompt_index"]
        assert record["caption"] == PROMPTS[prompt_index] and record["weight"] == 1.0
        assert origin["sample_seeds"] == [5 + 3 * prompt_index + k for k in range(3)]
        rewards = np.array(origin["sample_rewards"])
        assert origin["chosen"] == int(np.argmax(rewards)) and origin["rejected"] == int(np.argmin(rewards))
        assert origin["rewards"] == [rewards.max(), rewards.min()] and rewards.max() > rewards.min()
        for slot, sample in enumerate((origin["chosen"], origin["rejected"])):
            # Regenerated alone from its seed, the sample is what was stored and what was scored.
            alone = reference_pipeline(PROMPTS[prompt_index], seed=origin["sample_seeds"][sample], **settings).images
            assert relative_error(record["latents"][slot], np.asarray(alone)[0]) <= 1e-5
            image = (reference_pipeline.decode_latents(record["latents"][slot][None]) * 255).round().astype(np.uint8)
            assert abs(mean_brightness(image, [""])[0] - rewards[sample]) <= 1e-3
        text = np.asarray(reference_pipeline.encode_prompt([PROMPTS[prompt_index]])[0])[:MAX_TEXT_LEN]
        assert relative_error(record["text"], text) <= 1e-6

    metadata = generate_pairs(reference_pipeline, PROMPTS, mean_brightness, tmp_path / "margin", selection="margin",
                              margin=0.0, **GENERATION)
    margin = PreferenceSource(tmp_path / "margin")
    records = [margin[position] for position in range(len(margin))]
    by_prompt = {record["origin"]["prompt_index"]: record["origin"]["sample_rewards"] for record in records}
    expected = sorted((p, a, b) for p, rewards in by_prompt.items() for a in range(3) for b in range(3)
                      if rewards[a] > rewards[b])
    assert sorted((r["origin"]["prompt_index"], r["origin"]["chosen"], r["origin"]["rejected"]) for r in records) \
        == expected and len(expected) == 6
    data = build_preference_pipeline(margin, PipelineConfig(Curriculum((Stage(0, None, ((32, 32),), 2),))),
                                     shard_index=0, shard_count=1)
    batch = next(data.iterator())
    assert batch["latents_chosen"].shape == (2, 128, 2, 2) and batch["text_bth"].shape == (2, MAX_TEXT_LEN, 64)


def test_generated_pairs_command(random_pipeline_folder, tmp_path):
    from ernie_jax.data.generated_pairs import main as generate_main

    out = tmp_path / "pairs"
    # GENERATION's settings: the programs the test above compiled are reused.
    argv = ["--model", str(random_pipeline_folder), "--shapes-prompts", "2", "--out", str(out),
            "--reward", "tests.test_preferences:mean_brightness", "--samples-per-prompt", "3", "--height", "32",
            "--width", "32", "--steps", "2", "--guidance-scale", "2.0", "--seed", "5",
            "--max-text-len", str(MAX_TEXT_LEN)]
    assert run_command(generate_main, argv) == 0
    source = PreferenceSource(out)
    assert len(source) == 2 and {source[p]["caption"] for p in range(2)} == set(shapes_prompts(2))
    assert source.metadata["model_fingerprint"] == model_fingerprint(random_pipeline_folder)
    assert run_command(generate_main, argv) == 1  # the folder exists


def test_shapes_reward_is_one_on_true_scenes_and_lower_on_others():
    prompts = shapes.heldout_prompts(shapes.ShapesConfig(), 16)
    captions = [caption for caption, _ in prompts]
    images = np.stack([shapes.render(scene, 64, 64) for _, scene in prompts])
    np.testing.assert_array_equal(shapes_reward(images, captions), np.ones(16))
    shuffled = shapes_reward(np.roll(images, 1, axis=0), captions)
    assert shuffled.max() < 1.0 and shuffled.mean() < 0.6, shuffled
    # One object moved to another cell: colour, shape and count still read, its position not: 3 of 4.
    scene = shapes.Scene("shapes", (shapes.ShapeObject("red", "circle", "top left"),))
    moved = shapes.Scene("shapes", (shapes.ShapeObject("red", "circle", "bottom right"),))
    np.testing.assert_array_equal(shapes_reward(shapes.render(moved, 64, 64)[None], [shapes.caption(scene)]), [0.75])
    with pytest.raises(ValueError):
        shapes_reward(images[:1], ["a photo of a cat"])
    assert load_reward("shapes") is shapes_reward
    assert load_reward("numpy:mean") is np.mean
    with pytest.raises(ValueError, match="expected one of"):
        load_reward("aesthetic")
