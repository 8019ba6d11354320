"""ernie_jax.tokenizer against transformers' AutoTokenizer on tokenizers built in the test."""

from __future__ import annotations

import json

import pytest

from ernie_jax.tokenizer import Tokenizer, TokenizerError
from tests.tokenizer_fixtures import PE_CHAT_TEMPLATE, save_tokenizer

PROMPTS = ["", "a red circle", "一只猫, a cat with the word \"ERNIE\" on a sign",
           "a photo of a cat sitting on a wooden table " * 20]


@pytest.mark.parametrize("add_bos", [True, False], ids=["bos_post_processor", "no_bos"])
def test_encode_decode_match_transformers(add_bos, tmp_path):
    from transformers import AutoTokenizer

    folder = save_tokenizer(tmp_path, add_bos, model_max_length=32)
    reference = AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_folder(folder)
    for prompt in PROMPTS:
        expected = reference(prompt, add_special_tokens=True, truncation=True, padding=False)["input_ids"]
        assert ours.encode(prompt) == expected, prompt
        assert ours.encode(prompt, truncation=False) == reference(prompt)["input_ids"]
        assert ours.decode(expected) == reference.decode(expected, skip_special_tokens=True)
    assert len(ours.encode(PROMPTS[-1])) == 32  # truncated to model_max_length, special tokens included
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)


@pytest.mark.parametrize("add_bos", [True, False], ids=["bos_post_processor", "no_bos"])
def test_chat_template_matches_transformers(add_bos, tmp_path):
    from transformers import AutoTokenizer

    folder = save_tokenizer(tmp_path, add_bos, chat_template=PE_CHAT_TEMPLATE)
    reference = AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_folder(folder)
    user = json.dumps({"prompt": "一只猫 with \"quotes\" & <tags>", "width": 1024, "height": 768}, ensure_ascii=False)
    for messages in ([{"role": "user", "content": user}],
                     [{"role": "system", "content": "sys"}, {"role": "user", "content": user}]):
        expected_text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        text = ours.apply_chat_template(messages)
        assert text == expected_text
        # The pipeline tokenizes the rendered text again with special tokens: a double BOS where the
        # post-processor adds one, exactly as the reference does.
        assert ours.encode(text) == reference(expected_text)["input_ids"]
    with pytest.raises(Exception, match="unsupported role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_from_tokenizer_config_and_errors(tmp_path):
    folder = save_tokenizer(tmp_path / "a", True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}{{ messages[0]['content'] }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    plain = save_tokenizer(tmp_path / "b", False)
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_folder(plain).apply_chat_template([{"role": "user", "content": "hi"}])
