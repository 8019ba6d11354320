"""Loading every released layout, converting, exporting back, and refusing bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import ernie_jax
from conversions import convert, export, random_checkpoint, transformer as weights
from conversions.common import run_command
from conversions.safetensors_io import CheckpointError, TensorSource, write_safetensors
from tests.conftest import TINY, relative_error
from tests.test_dit import make_inputs, reference_forward

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(2, 4, 5, [6, 3], TINY["text_in_dim"])


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def forward(model, inputs) -> np.ndarray:
    return np.asarray(model(*inputs))


def test_single_file_with_comfy_prefix(tiny_reference, tiny_folder, tmp_path, inputs):
    path = tmp_path / "ernie-image.safetensors"
    write_safetensors(path, {f"model.diffusion_model.{k}": v for k, v in state_dict_numpy(tiny_reference).items()})
    model = ernie_jax.load_transformer(path)  # no config beside it: inferred from the shapes
    assert model.config == ernie_jax.ErnieImageConfig.from_json_file(tiny_folder / "config.json")
    np.testing.assert_array_equal(forward(model, inputs), forward(ernie_jax.load_transformer(tiny_folder), inputs))


def test_sharded_checkpoint(tiny_reference, tmp_path, inputs):
    tiny_reference.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / weights.INDEX_NAME).is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    expected = reference_forward(tiny_reference, *inputs)
    assert relative_error(forward(ernie_jax.load_transformer(tmp_path), inputs), expected) <= 1e-5


def test_pipeline_folder_uses_its_transformer(tiny_folder, tmp_path, inputs):
    shutil.copytree(tiny_folder, tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ErnieImagePipeline"}))
    np.testing.assert_array_equal(forward(ernie_jax.load_transformer(tmp_path), inputs),
                                  forward(ernie_jax.load_transformer(tiny_folder), inputs))


def test_unknown_extra_tensors_warn(tiny_reference, tmp_path, inputs, caplog):
    tensors = state_dict_numpy(tiny_reference)
    tensors["some_extra.weight"] = np.zeros(3, np.float32)
    write_safetensors(tmp_path / weights.WEIGHTS_NAME, tensors)
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, rope_axes_dim=list(TINY["rope_axes_dim"]))))
    with caplog.at_level("WARNING"):
        ernie_jax.load_transformer(tmp_path)
    assert "some_extra.weight" in caplog.text


def test_convert_then_load_and_export_roundtrip(tiny_reference, tiny_folder, tmp_path, inputs):
    from diffusers import ErnieImageTransformer2DModel

    convert.convert(tiny_folder, tmp_path / "converted")
    converted = ernie_jax.load_transformer(tmp_path / "converted")
    np.testing.assert_array_equal(forward(converted, inputs), forward(ernie_jax.load_transformer(tiny_folder), inputs))

    export.export(tmp_path / "converted", tmp_path / "exported")
    exported = ErnieImageTransformer2DModel.from_pretrained(tmp_path / "exported").eval()
    original = tiny_reference.state_dict()
    for key, value in exported.state_dict().items():
        assert torch.equal(value, original[key]), key
    np.testing.assert_array_equal(reference_forward(exported, *inputs), reference_forward(tiny_reference, *inputs))


def test_export_sharded_and_bf16_convert(tiny_folder, tmp_path, inputs):
    from diffusers import ErnieImageTransformer2DModel

    convert.convert(tiny_folder, tmp_path / "bf16", dtype="bfloat16")
    model = ernie_jax.load_transformer(tmp_path / "bf16", "bfloat16")
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("bfloat16")}
    files = export.export(tmp_path / "bf16", tmp_path / "exported", max_shard_bytes=1_000_000)
    assert weights.INDEX_NAME in files and len(files) > 3
    reloaded = ErnieImageTransformer2DModel.from_pretrained(tmp_path / "exported", torch_dtype=torch.bfloat16)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    np.testing.assert_array_equal(forward(ernie_jax.load_transformer(tmp_path / "exported", "bfloat16"), inputs),
                                  forward(model, inputs))


def test_random_checkpoint_loads_in_diffusers(tmp_path, inputs):
    from diffusers import ErnieImageTransformer2DModel

    random_checkpoint.write_random_transformer(tmp_path / "random", ernie_jax.ErnieImageConfig(
        **dict(TINY, rope_axes_dim=(32, 48, 48))), seed=3)
    reference = ErnieImageTransformer2DModel.from_pretrained(tmp_path / "random").eval()
    expected = reference_forward(reference, *inputs)
    assert np.abs(expected).max() > 0.1  # every tensor random, including the reference's zero-initialised ones
    assert relative_error(forward(ernie_jax.load_transformer(tmp_path / "random"), inputs), expected) <= 1e-5


# --- bad inputs: one clear line, exit status 1, nothing at DST ----------------------------------------------


def write_folder(path: Path, tensors: dict, config: dict | None = None) -> Path:
    path.mkdir()
    write_safetensors(path / weights.WEIGHTS_NAME, tensors)
    (path / "config.json").write_text(json.dumps(config or dict(TINY, rope_axes_dim=[32, 48, 48])))
    return path


def bad_sources(tmp_path: Path, tiny_reference) -> dict[str, tuple[Path, str]]:
    tensors = state_dict_numpy(tiny_reference)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    write_safetensors(no_config / weights.WEIGHTS_NAME, tensors)

    truncated = write_folder(tmp_path / "truncated", tensors)
    with open(truncated / weights.WEIGHTS_NAME, "r+b") as f:
        f.truncate(os.path.getsize(truncated / weights.WEIGHTS_NAME) - 1000)

    not_safetensors = tmp_path / "not_safetensors"
    not_safetensors.mkdir()
    (not_safetensors / weights.WEIGHTS_NAME).write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    (not_safetensors / "config.json").write_text(json.dumps(dict(TINY, rope_axes_dim=[32, 48, 48])))

    missing = dict(tensors)
    del missing["layers.1.mlp.up_proj.weight"]
    wrong = dict(tensors)
    wrong["final_linear.bias"] = np.zeros(64, np.float32)
    return {
        "missing folder": (tmp_path / "does_not_exist", "no such file or folder"),
        "folder without config": (no_config, "no config.json"),
        "truncated safetensors": (truncated, "truncated"),
        "not a safetensors file": (not_safetensors, "not a safetensors file"),
        "missing tensor": (write_folder(tmp_path / "missing", missing), "layers.1.mlp.up_proj.weight"),
        "wrong shape": (write_folder(tmp_path / "wrong", wrong), "final_linear.bias (64,)"),
        "config disagrees (fewer layers)": (
            write_folder(tmp_path / "fewer", tensors, dict(TINY, rope_axes_dim=[32, 48, 48], num_layers=1)),
            "config disagrees with the weights"),
        "config disagrees (wider)": (
            write_folder(tmp_path / "wider", tensors, dict(TINY, rope_axes_dim=[32, 48, 48], ffn_hidden_size=1024)),
            "config disagrees with the weights"),
        "config with an unknown key": (
            write_folder(tmp_path / "unknown_key", tensors, dict(TINY, rope_axes_dim=[32, 48, 48], hiden_size=3)),
            "unknown keys"),
    }


def test_bad_inputs_give_one_line_and_leave_nothing(tiny_reference, tiny_folder, tmp_path, capsys):
    out, sources = tmp_path / "out", tmp_path / "src"
    out.mkdir()
    sources.mkdir()
    for case, (source, message) in bad_sources(sources, tiny_reference).items():
        for command in (convert.main, export.main):
            destination = out / "dst"
            assert run_command(command, [str(source), str(destination)]) == 1, case
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and "\n" not in err and message in err, (case, err)
            assert list(out.iterdir()) == [], case
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ernie_jax.load_transformer(source)

    existing = out / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert run_command(convert.main, [str(tiny_folder), str(existing)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_failure_midway_leaves_nothing(tiny_folder, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert.files, "save_params", explode)
    with pytest.raises(OSError):
        convert.convert(tiny_folder, tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


def test_commands_exit_nonzero_from_the_shell(tmp_path):
    result = subprocess.run([sys.executable, "-m", "conversions.convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: no such file or folder"
    assert not (tmp_path / "o").exists()


def test_tensor_source_reads_bf16_and_rejects_bad_index(tmp_path):
    import ml_dtypes

    values = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "a.safetensors", {"x": values})
    np.testing.assert_array_equal(TensorSource([tmp_path / "a.safetensors"])["x"], values)
    (tmp_path / "index.json").write_text(json.dumps({"weight_map": {"x": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard files missing"):
        TensorSource.from_index(tmp_path / "index.json")


def test_convert_with_relative_paths(tiny_folder, tmp_path, monkeypatch, inputs):
    monkeypatch.chdir(tmp_path)
    assert run_command(convert.main, [str(tiny_folder), "relative/converted"]) == 0
    np.testing.assert_array_equal(forward(ernie_jax.load_transformer("relative/converted"), inputs),
                                  forward(ernie_jax.load_transformer(tiny_folder), inputs))
