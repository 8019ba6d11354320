"""The LLM caption rewriter batch job (`python -m ernie_jax.data.rewrite_captions`) on a tiny random Mistral."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conversions.common import run_command
from conversions.random_checkpoint import write_tokenizer
from ernie_jax.data import rewrite_captions
from ernie_jax.data.prompt_styles import StyledSource, StyleMix
from ernie_jax.data.sources import FolderSource
from ernie_jax.tokenizer import Tokenizer
from tests.test_data import tiny_records, write_folder
from tests.test_mistral import randomise

RECORDS = 10
STYLES = ("keywords", "request")
ARGS = ["--styles", ",".join(STYLES), "--chunk-size", "3", "--batch-size", "4", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A transformers MistralForCausalLM with random weights and a trained BPE tokenizer in one folder."""
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("lm") / "model"
    write_tokenizer(folder, add_bos=True, model_max_length=512)
    tokenizer = Tokenizer.from_folder(folder)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=tokenizer.backend.get_vocab_size(), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    randomise(MistralForCausalLM(config), 1, 0.2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    records = tiny_records(RECORDS)
    for index, record in enumerate(records):
        record["caption"] = f"A photo of a small {('red', 'blue')[index % 2]} boat number {index} on a calm lake."
    write_folder(root, records)
    return root


def run(lm_folder, image_folder, out, *extra) -> int:
    return run_command(rewrite_captions.main, ["--model", str(lm_folder), "--source", str(image_folder),
                                               "--out", str(out), *ARGS, *extra])


def files_of(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def rows_of(folder) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.rglob("*.jsonl")) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(lm_folder, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("rewrites") / "out"
    assert run(lm_folder, image_folder, out) == 0
    return out


def test_layout_and_resume_after_a_kill_writes_the_same_files(lm_folder, image_folder, uninterrupted, tmp_path,
                                                              monkeypatch, capsys):
    expected = files_of(uninterrupted)
    shard = "shard-00000-of-00001"
    assert sorted(expected) == [f"{shard}/chunk-00000{k}.jsonl" for k in range(4)] + [f"{shard}/job.json"]
    rows = rows_of(uninterrupted)
    assert [(row["index"], row["style"]) for row in rows] == [(i, s) for i in range(RECORDS) for s in STYLES]
    assert all(row["rewrite"] for row in rows) and len({row["rewrite"] for row in rows}) > 2
    chunk_indices = [{json.loads(line)["index"] for line in text.decode().splitlines()}
                     for name, text in expected.items() if name.endswith(".jsonl")]
    assert chunk_indices == [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}, {9}]

    # Killed during its third generation call (chunk 1's second batch): chunk 0 is complete, nothing else.
    calls = []
    generate = rewrite_captions.Rewriter.generate

    def dying(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate(self, *args)

    monkeypatch.setattr(rewrite_captions.Rewriter, "generate", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(lm_folder, image_folder, out)
    assert sorted(files_of(out)) == [f"{shard}/chunk-000000.jsonl", f"{shard}/job.json"]
    monkeypatch.setattr(rewrite_captions.Rewriter, "generate", generate)

    # Resumed, then killed half-way through writing chunk 2's file: no chunk 2 appears.
    write_text = Path.write_text

    def dying_write(path, text, *args, **kwargs):
        if "chunk-000002" in path.name:
            write_text(path, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(lm_folder, image_folder, out)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert {f"{shard}/chunk-000000.jsonl", f"{shard}/chunk-000001.jsonl"} <= set(files_of(out))
    assert f"{shard}/chunk-000002.jsonl" not in files_of(out)

    resumed_calls = []

    def counting(self, *args):
        resumed_calls.append(1)
        return generate(self, *args)

    monkeypatch.setattr(rewrite_captions.Rewriter, "generate", counting)
    capsys.readouterr()
    assert run(lm_folder, image_folder, out) == 0
    assert files_of(out) == expected  # no partial file left either
    # Only chunks 2 and 3 were generated again: 6 and 2 prompts in batches of 4.
    assert len(resumed_calls) == 3
    assert capsys.readouterr().out.strip().endswith("keywords 10, request 10")

    # The style mix reads the rewrites back by (record, style).
    mix = StyleMix(weights={"keywords": 1, "request": 1}, keep_dense=0.3, rewriter="llm", rewrites=str(out))
    styled = StyledSource(FolderSource(image_folder), mix)
    by_key = {(row["index"], row["style"]): row["rewrite"] for row in rows}
    for index in range(RECORDS):
        record = styled[index]
        if record["caption_style"] != "dense":
            assert record["caption"] == by_key[index, record["caption_style"]]


def test_shards_partition_the_records(lm_folder, image_folder, uninterrupted, tmp_path):
    for shard in range(2):
        assert run(lm_folder, image_folder, tmp_path / "out", "--shard-index", str(shard), "--shard-count", "2") == 0
    first, second = (rows_of(tmp_path / "out" / f"shard-0000{k}-of-00002") for k in range(2))
    assert {row["index"] for row in first} == set(range(0, RECORDS, 2))
    assert {row["index"] for row in second} == set(range(1, RECORDS, 2))
    # Greedy rewrites do not depend on which rows share a batch.
    assert sorted(first + second, key=lambda r: (r["index"], r["style"])) == rows_of(uninterrupted)
    # A style mix needs every record's rewrite in every style it can draw.
    mix = StyleMix(weights={"keywords": 1, "request": 1}, rewriter="llm", rewrites=str(tmp_path / "out"))
    StyledSource(FolderSource(image_folder), mix)
    for missing, message in ((dataclasses.replace(mix, rewrites=str(tmp_path / "out" / "shard-00000-of-00002")),
                              "5 of 10 records have no 'keywords' rewrite"),
                             (dataclasses.replace(mix, weights={"keywords": 1, "instruction": 1}),
                              "10 of 10 records have no 'instruction' rewrite")):
        with pytest.raises(ValueError, match=message):
            StyledSource(FolderSource(image_folder), missing)


def test_a_rewrite_equals_transformers_greedy_decoding(lm_folder, image_folder, uninterrupted):
    from transformers import AutoTokenizer, MistralForCausalLM

    caption = FolderSource(image_folder)[4]["caption"]
    row = next(r for r in rows_of(uninterrupted) if (r["index"], r["style"]) == (4, "request"))
    prompt = rewrite_captions.style_prompt(Tokenizer.from_folder(lm_folder), caption, "request")
    assert caption in prompt
    reference_tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    ids = torch.tensor([reference_tokenizer(prompt)["input_ids"]])
    model = MistralForCausalLM.from_pretrained(lm_folder).eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             eos_token_id=reference_tokenizer.eos_token_id,
                             pad_token_id=reference_tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].numpy()
    assert len(set(new.tolist())) > 2  # not one repeated token
    assert row["rewrite"] == reference_tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("extra, message", [
    (["--styles", "dense"], "--styles 'dense': each must be one of"),
    (["--shard-index", "2", "--shard-count", "2"], "shard 2 of 2 is not a valid shard"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", "missing"], "not a folder"),
    (["--source", "missing"], "does not exist or is not a folder"),
    (["--styles", "keywords"], "holds a job with other settings (instructions, styles)"),
])
def test_bad_arguments_give_one_error_line(lm_folder, image_folder, uninterrupted, tmp_path, capsys, extra, message):
    out = uninterrupted if "holds a job" in message else tmp_path / "out"
    before = files_of(uninterrupted)
    argv = ["--model", str(lm_folder), "--source", str(image_folder), "--out", str(out), *ARGS, *extra]
    argv = [str(tmp_path / "missing") if value == "missing" else value for value in argv]
    assert run_command(rewrite_captions.main, argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error
    assert files_of(uninterrupted) == before
    assert not (tmp_path / "out").exists()
