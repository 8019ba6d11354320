"""Precomputed latents and text features: the offline tool, the record format and the precomputed pipeline."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from conversions.common import run_command
from ernie_jax.data.buckets import as_buckets, assign_buckets, resize_and_crop
from ernie_jax.data.curriculum import Curriculum, Stage
from ernie_jax.data.pipeline import PipelineConfig, build_pipeline
from ernie_jax.data.precompute import (
    BatchEncoder,
    PrecomputeConfig,
    load_encoders,
    main,
    model_fingerprint,
    precompute,
)
from ernie_jax.data.precomputed import (
    PrecomputedSource,
    build_precomputed_pipeline,
    decode_record,
    encode_record,
)
from ernie_jax.data.prompt_styles import STYLES, StyledSource, StyleMix
from ernie_jax.data.sources import FolderSource, decode_image
from ernie_jax.models.vae import encode_to_packed_latents
from tests.conftest import relative_error
from tests.test_data import png_bytes, random_image, write_folder

BUCKETS = ((32, 32), (32, 48), (48, 32))
MAX_TEXT_LEN = 12
WORDS = ("red", "green", "blue", "square", "circle", "on", "a", "white", "ground", "with", "soft", "light", "and",
         "long", "shadows")


def make_records(count: int = 20) -> list[dict]:
    """Images around the BUCKETS aspects plus one 16x80 strip (beyond the crop bound), captions of 1 to 15
    words (some longer than MAX_TEXT_LEN tokens), three categories."""
    rng = np.random.default_rng(0)
    sizes = ((20, 20), (24, 36), (36, 24), (30, 40), (40, 28))
    records = []
    for index in range(count):
        size = (16, 80) if index == 7 else sizes[index % len(sizes)]
        caption = f"{index} " + " ".join(rng.choice(WORDS, 1 + index % 15))
        records.append({"image": png_bytes(random_image(rng, *size)), "caption": caption,
                        "category": ("cat", "dog", "bird")[index % 3], "aesthetic": float(rng.uniform(1, 5))})
    return records


def caption_index(caption: str) -> int:
    return int(caption.split()[0])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_folder(root, make_records())
    (root / "img003.png").write_bytes(b"not an image")   # unreadable
    (root / "img011.txt").unlink()                      # no caption
    return root


@pytest.fixture(scope="module")
def precomputed_folder(random_pipeline_folder, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "precomputed"
    argv = ["--model", str(random_pipeline_folder), "--source", str(image_folder), "--out", str(out),
            "--buckets", ",".join(f"{h}x{w}" for h, w in BUCKETS), "--max-text-len", str(MAX_TEXT_LEN),
            "--batch-size", "4", "--shard-size", "5"]
    assert run_command(main, argv) == 0
    return out


@pytest.fixture(scope="module")
def reference_pipeline(random_pipeline_folder):
    from ernie_jax.pipeline import ErnieImagePipeline

    return ErnieImagePipeline.from_pretrained(random_pipeline_folder, dtype="float32")


def expected_source_indices(image_folder) -> list[int]:
    return [index for index in range(len(FolderSource(image_folder))) if index not in (3, 7, 11)]


def test_metadata_counts_skips_and_files(precomputed_folder, image_folder):
    metadata = json.loads((precomputed_folder / "metadata.json").read_text())
    assert metadata["skipped"] == {"unreadable": {"UnidentifiedImageError": 1, "FileNotFoundError": 1}, "crop": 1}
    assert metadata["records"] == 17 and metadata["source_records"] == 20
    assert [file["records"] for file in metadata["files"]] == [5, 5, 5, 2]
    assert metadata["buckets"] == [list(bucket) for bucket in BUCKETS]
    assert (metadata["latent_channels"], metadata["text_dim"], metadata["dtype"]) == (128, 64, "float32")
    source = PrecomputedSource(precomputed_folder)
    assert sorted(source.index["source_index"].tolist()) == expected_source_indices(image_folder)
    assert not list(precomputed_folder.parent.glob(".precomputed.tmp-*"))


def test_stored_latents_equal_the_vae_encoding_of_the_cropped_images(precomputed_folder, image_folder,
                                                                       reference_pipeline):
    images = FolderSource(image_folder)
    source = PrecomputedSource(precomputed_folder)
    buckets = as_buckets(BUCKETS)
    encode = nnx.jit(encode_to_packed_latents)
    errors = []
    for position in range(len(source)):
        record = source[position]
        image = decode_image(images[record["source_index"]]["image"])
        bucket = buckets[assign_buckets([image.shape[0]], [image.shape[1]], buckets)[0]]
        assert record["bucket"] == [bucket.height, bucket.width]
        assert record["image_size"] == list(image.shape[:2])
        pixels = (resize_and_crop(image, bucket).astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)[None]
        expected = np.asarray(encode(reference_pipeline.vae, jnp.asarray(pixels)))[0]
        assert record["latents"].shape == (128, bucket.height // 16, bucket.width // 16)
        errors.append(relative_error(record["latents"], expected))
    # XLA's CPU convolutions round differently for a batch of 4 (the tool's) and of 1 (2e-6 measured).
    assert max(errors) <= 1e-5, max(errors)


def test_stored_text_equals_encode_prompt_cut_to_max_text_len(precomputed_folder, image_folder,
                                                              reference_pipeline):
    source = PrecomputedSource(precomputed_folder)
    errors, truncated = [], 0
    for position in range(len(source)):
        record = source[position]
        assert record["caption"] == FolderSource(image_folder)[record["source_index"]]["caption"]
        expected = np.asarray(reference_pipeline.encode_prompt([record["caption"]])[0])
        truncated += expected.shape[0] > MAX_TEXT_LEN
        expected = expected[:MAX_TEXT_LEN]
        assert record["text"].shape == expected.shape
        assert source.index["text_length"][position] == expected.shape[0]
        errors.append(relative_error(record["text"], expected))
    assert max(errors) <= 1e-6, max(errors)
    assert 0 < truncated < len(source)
    assert json.loads((precomputed_folder / "metadata.json").read_text())["truncated_texts"] == truncated
    empty = np.asarray(reference_pipeline.encode_prompt([""])[0])
    assert source.empty_prompt.shape == empty.shape == (1, 64)
    assert relative_error(source.empty_prompt, empty) <= 1e-6


def tiny_config(seed: int = 3) -> PipelineConfig:
    return PipelineConfig(Curriculum((Stage(0, None, BUCKETS, 4),)), seed=seed)


def test_precomputed_batches_follow_the_image_pipeline(precomputed_folder, image_folder):
    source = PrecomputedSource(precomputed_folder)
    by_index = {record["source_index"]: record for record in (source[p] for p in range(len(source)))}
    images = build_pipeline(FolderSource(image_folder), tiny_config(), shard_index=0, shard_count=1)
    precomputed = build_precomputed_pipeline(source, tiny_config(), shard_index=0, shard_count=1, text_multiple=8)
    # The image catalog also holds the strip beyond the crop bound, which is never drawn.
    kept = images.catalog.indices != 7
    np.testing.assert_array_equal(precomputed.catalog.indices, images.catalog.indices[kept])
    np.testing.assert_array_equal(precomputed.catalog.aesthetics, images.catalog.aesthetics[kept])
    np.testing.assert_array_equal(precomputed.tables[0].bucket_probs, images.tables[0].bucket_probs)
    buckets_seen = set()
    for step in range(30):
        want, got = images.dataset[step], precomputed.dataset[step]
        assert list(got["captions"]) == list(want["captions"])
        assert got["bucket"] == want["bucket"] and got["stage"] == want["stage"] == 0
        np.testing.assert_array_equal(got["category"], want["category"])
        np.testing.assert_array_equal(got["aesthetic"], want["aesthetic"])
        height, width = got["bucket"]
        buckets_seen.add(got["bucket"])
        assert got["latents"].dtype == np.float32 and got["latents"].shape == (4, 128, height // 16, width // 16)
        assert got["text_lens"].dtype == np.int32 and got["text"].dtype == np.float32
        assert got["text"].shape[1] == -(-int(got["text_lens"].max()) // 8) * 8 and got["text"].shape[2] == 64
        for row, caption in enumerate(got["captions"]):
            record = by_index[caption_index(caption)]
            np.testing.assert_array_equal(got["latents"][row], record["latents"])
            length = got["text_lens"][row]
            assert length == record["text"].shape[0]
            np.testing.assert_array_equal(got["text"][row, :length], record["text"])
            assert not got["text"][row, length:].any()
    assert len(buckets_seen) == 3
    other_seed = build_precomputed_pipeline(source, tiny_config(seed=4), shard_index=0, shard_count=1)
    assert any(list(other_seed.dataset[step]["captions"]) != list(images.dataset[step]["captions"])
               for step in range(5))


def test_a_caption_style_mix_is_precomputed_as_the_image_pipeline_rewrites(precomputed_folder,
                                                                          random_pipeline_folder, image_folder,
                                                                          reference_pipeline, tmp_path):
    mix = StyleMix(keep_dense=0.2, seed=2)
    out = tmp_path / "styled"
    argv = ["--model", str(random_pipeline_folder), "--source", str(image_folder), "--out", str(out), "--buckets",
            ",".join(f"{h}x{w}" for h, w in BUCKETS), "--max-text-len", "64", "--batch-size", "4",
            "--caption-styles", json.dumps({"keep_dense": 0.2, "seed": 2})]
    assert run_command(main, argv) == 0
    source = PrecomputedSource(out)
    assert source.metadata["caption_styles"] == mix.to_dict()
    styled = StyledSource(FolderSource(image_folder), mix)
    for position in range(len(source)):
        record = source[position]
        want = styled[record["source_index"]]
        assert (record["caption"], record["caption_style"]) == (want["caption"], want["caption_style"])
        expected = np.asarray(reference_pipeline.encode_prompt([record["caption"]])[0])
        assert relative_error(record["text"], expected) <= 1e-6
    config = dataclasses.replace(tiny_config(), caption_styles=mix)
    images = build_pipeline(FolderSource(image_folder), config, shard_index=0, shard_count=1)
    precomputed = build_precomputed_pipeline(source, config, shard_index=0, shard_count=1)
    styles = set()
    for step in range(12):
        want, got = images.dataset[step], precomputed.dataset[step]
        assert list(got["captions"]) == list(want["captions"])
        np.testing.assert_array_equal(got["caption_style"], want["caption_style"])
        styles |= {STYLES[s] for s in got["caption_style"]}
    assert len(styles) >= 3
    # Features precomputed with one mix are refused for another (or for none), and the reverse.
    for other in (tiny_config(), dataclasses.replace(tiny_config(), caption_styles=dataclasses.replace(mix, seed=3))):
        with pytest.raises(ValueError, match="caption style mix"):
            build_precomputed_pipeline(source, other, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="caption style mix None"):
        build_precomputed_pipeline(PrecomputedSource(precomputed_folder), config, shard_index=0, shard_count=1)


def test_a_stage_needs_a_source_with_its_buckets(precomputed_folder):
    source = PrecomputedSource(precomputed_folder)
    config = PipelineConfig(Curriculum((Stage(0, None, ((32, 32), (32, 48)), 4),)))
    with pytest.raises(ValueError, match="no precomputed source has its buckets"):
        build_precomputed_pipeline(source, config, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="max_crop_fraction 0.5 exceeds the bound 0.25"):
        build_precomputed_pipeline(source, PipelineConfig(tiny_config().curriculum, max_crop_fraction=0.5),
                                   shard_index=0, shard_count=1)


def test_host_shards_read_as_one_source_and_failures_leave_nothing(precomputed_folder, random_pipeline_folder,
                                                                   image_folder, tmp_path, monkeypatch):
    encoders = load_encoders(random_pipeline_folder)
    config = PrecomputeConfig(BUCKETS, max_text_len=MAX_TEXT_LEN, batch_size=4, shard_size=5)
    source = FolderSource(image_folder)
    parts = [tmp_path / f"part{index}" for index in range(2)]
    for index, part in enumerate(parts):
        precompute(encoders, source, part, config, shard_index=index, shard_count=2, progress=False)
    whole, combined = PrecomputedSource(precomputed_folder), PrecomputedSource(parts)
    assert sorted(combined.index["source_index"].tolist()) == sorted(whole.index["source_index"].tolist())
    for source_index in (0, 1, 2, 19):
        got, want = combined.record_of(source_index), whole.record_of(source_index)
        assert got["caption"] == want["caption"]
        assert relative_error(got["latents"], want["latents"]) <= 1e-6
    with pytest.raises(ValueError, match=r"hold shards \[1\] of 2"):
        PrecomputedSource(parts[1:])

    calls = []

    def failing_latents(self, images):
        calls.append(len(images))
        if len(calls) > 1:
            raise RuntimeError("encoder failed")
        return original(self, images)

    original = BatchEncoder.latents
    monkeypatch.setattr(BatchEncoder, "latents", failing_latents)
    with pytest.raises(RuntimeError, match="encoder failed"):
        precompute(encoders, source, tmp_path / "failed", config, progress=False)
    assert len(calls) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["part0", "part1"]


def test_records_round_trip_in_bfloat16():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(128, 2, 3)).astype(ml_dtypes.bfloat16)
    text = rng.normal(size=(5, 64)).astype(ml_dtypes.bfloat16)
    header = {"source_index": 4, "caption": "ünïcode", "category": "cat", "aesthetic": None}
    record = decode_record(encode_record(header, latents, text))
    assert record["latents"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(record["latents"], latents)
    np.testing.assert_array_equal(record["text"], text)
    assert {key: record[key] for key in header} == header
    with pytest.raises(ValueError, match="must share one of"):
        encode_record(header, latents.astype(np.float32), text)


@pytest.mark.parametrize("change, message", [
    ({"--model": "missing"}, "no model_index.json"),
    ({"--source": "missing"}, "does not exist or is not a folder"),
    ({"--stage-side": "100", "--buckets": None}, "stage side 100 is not a positive multiple of 16"),
    ({"--stage-side": "256"}, "exactly one of --stage-side and --buckets"),
    ({"--buckets": "32x40"}, "width 40 is not a positive multiple of 16"),
    ({"--buckets": "32,48"}, "expected HEIGHTxWIDTH pairs"),
    ({"--out": "exists"}, "already exists"),
    ({"--caption-styles": "{keep_dense: 1}"}, "--caption-styles '{keep_dense: 1}' is not JSON"),
    ({"--caption-styles": '{"keep": 1}'}, "unexpected keyword argument 'keep'"),
    ({"--caption-styles": '{"keep_dense": 2}'}, "keep_dense must be in [0, 1]"),
])
def test_cli_errors_are_one_line(tmp_path, image_folder, capsys, change, message):
    (tmp_path / "exists").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    args = {"--model": str(tmp_path / "model"), "--source": str(image_folder), "--out": str(tmp_path / "out"),
            "--buckets": "32x32"}
    for key, value in change.items():
        args[key] = None if value is None else (str(tmp_path / value) if key in ("--model", "--source", "--out")
                                                else value)
    argv = [item for key, value in args.items() if value is not None for item in (key, value)]
    assert run_command(main, argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error
    assert not (tmp_path / "out").exists()


def drop_record(folder, out, source_index: int) -> None:
    """Copies a precomputed folder without the record of `source_index` (one records file)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source = PrecomputedSource(folder)
    keep = np.flatnonzero(source.index["source_index"] != source_index)
    out.mkdir()
    writer = ArrayRecordWriter(str(out / "records-00000.array_record"), "group_size:1")
    for position in keep:
        writer.write(source.records[int(position)])
    writer.close()
    np.savez(out / "index.npz", **{name: values[keep] for name, values in source.index.items()})
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata.update(records=len(keep), files=[{"name": "records-00000.array_record", "records": len(keep)}])
    (out / "metadata.json").write_text(json.dumps(metadata))


def test_each_curriculum_stage_reads_the_source_of_its_buckets(precomputed_folder, random_pipeline_folder,
                                                               image_folder, tmp_path):
    second_buckets = ((48, 48), (48, 64), (64, 48))
    config = PrecomputeConfig(second_buckets, max_text_len=MAX_TEXT_LEN, batch_size=4)
    precompute(load_encoders(random_pipeline_folder), FolderSource(image_folder), tmp_path / "second", config,
               model_fingerprint=model_fingerprint(random_pipeline_folder), progress=False)
    curriculum = Curriculum((Stage(0, 3, BUCKETS, 4), Stage(3, None, second_buckets, 2)))
    sources = (PrecomputedSource(tmp_path / "second"), PrecomputedSource(precomputed_folder))
    precomputed = build_precomputed_pipeline(sources, PipelineConfig(curriculum, seed=1), shard_index=0, shard_count=1)
    images = build_pipeline(FolderSource(image_folder), PipelineConfig(curriculum, seed=1), shard_index=0,
                            shard_count=1)
    for step in range(6):
        want, got = images.dataset[step], precomputed.dataset[step]
        assert (got["stage"], got["bucket"], list(got["captions"])) == (want["stage"], want["bucket"],
                                                                         list(want["captions"]))
        height, width = got["bucket"]
        assert got["latents"].shape == (4 if step < 3 else 2, 128, height // 16, width // 16)
    assert {precomputed.dataset[step]["bucket"] for step in range(3, 40)} <= set(second_buckets)

    # A record missing from the second stage's source (its image failed to decode there) is replaced.
    drop_record(tmp_path / "second", tmp_path / "missing", source_index=0)
    precomputed = build_precomputed_pipeline((PrecomputedSource(tmp_path / "missing"), sources[1]),
                                             PipelineConfig(curriculum, seed=1), shard_index=0, shard_count=1)
    batches = [precomputed.dataset[step] for step in range(3, 40)]
    assert all(caption_index(caption) != 0 for batch in batches for caption in batch["captions"])
    skipped = sum(batch["num_skipped"] for batch in batches)
    assert skipped > 0 and precomputed.stats.load_skipped == {"MissingRecordError": skipped}

    shutil.copytree(tmp_path / "second", tmp_path / "other_model")
    metadata = json.loads((tmp_path / "other_model" / "metadata.json").read_text())
    (tmp_path / "other_model" / "metadata.json").write_text(json.dumps({**metadata, "model_fingerprint": "other"}))
    with pytest.raises(ValueError, match="differ in model_fingerprint"):
        build_precomputed_pipeline((PrecomputedSource(tmp_path / "other_model"), sources[1]),
                                   PipelineConfig(curriculum), shard_index=0, shard_count=1)


def test_open_source_reads_tfds_folders_and_rejects_empty_ones(tmp_path):
    from ernie_jax.data.precompute import open_source
    from ernie_jax.data.sources import TfdsSource
    from ernie_jax.data.tfds_io import write_tfds_dataset

    source = open_source(write_tfds_dataset(tmp_path / "tfds", {"train": make_records(3)}))
    assert isinstance(source, TfdsSource) and len(source) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no records"):
        open_source(tmp_path / "empty")


def retrain(weights) -> None:
    """Rewrites a safetensors file with every tensor changed (same names, dtypes and shapes, so the same
    file size): what a retrained encoder of the same architecture looks like on disk."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(weights, "np") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    save_file({name: (value * 0.5 + 0.25).astype(value.dtype) if value.dtype.kind == "f" else value
               for name, value in tensors.items()}, weights, metadata=metadata)


@pytest.mark.parametrize("sampled", [False, True], ids=["whole", "sampled"])
def test_fingerprint_refuses_a_retrained_vae(random_pipeline_folder, tmp_path, monkeypatch, sampled):
    from ernie_jax.data import precompute as precompute_module

    if sampled:  # the tiny VAE's weights read as a multi-GB file's are: header and strided blocks
        monkeypatch.setattr(precompute_module, "FINGERPRINT_CONTENT_BYTES", 1 << 10)
        monkeypatch.setattr(precompute_module, "FINGERPRINT_SAMPLE_BYTES", 64)
    retrained = tmp_path / "retrained"
    shutil.copytree(random_pipeline_folder, retrained)
    (weights,) = (retrained / "vae").glob("*.safetensors")
    size = weights.stat().st_size
    retrain(weights)
    assert weights.stat().st_size == size
    assert model_fingerprint(retrained) != model_fingerprint(random_pipeline_folder)
    # The transformer is not an encoder: retraining it leaves the features valid.
    shutil.rmtree(retrained)
    shutil.copytree(random_pipeline_folder, retrained)
    for weights in (retrained / "transformer").glob("*.safetensors"):
        retrain(weights)
    assert model_fingerprint(retrained) == model_fingerprint(random_pipeline_folder)


def read_bytes_of_this_process() -> int:
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])


def test_fingerprint_of_multi_gb_weights_reads_their_header_and_256_kib(tmp_path):
    """A sparse 8 GiB safetensors file (nothing on disk): the fingerprint reads its header and 64 blocks of
    4 KiB (measured 270,469 bytes with Python's read buffering), and a change in a sampled block changes it."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2, 2**30], "data_offsets": [0, 2**33]}}).encode()
    weights = tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    with open(weights, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2**33)
    before = read_bytes_of_this_process()
    fingerprint = model_fingerprint(tmp_path / "model")
    read = read_bytes_of_this_process() - before
    assert 64 * 4096 <= read <= 64 * 4096 + 8 + len(header) + 16384, read  # 16 KiB: buffering slack
    with open(weights, "r+b") as f:  # the last block is one of the samples
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    assert model_fingerprint(tmp_path / "model") != fingerprint
