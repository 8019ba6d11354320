"""Tokenizer folders built in the tests (the released tokenizer files cannot be downloaded here)."""

from __future__ import annotations

from pathlib import Path

from conversions.random_checkpoint import PE_CHAT_TEMPLATE, train_tokenizer

__all__ = ["PE_CHAT_TEMPLATE", "save_tokenizer"]


def save_tokenizer(folder: Path, add_bos: bool, model_max_length: int = 2048, chat_template: str | None = None):
    """Saves a tokenizer folder with transformers' own writer (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) and returns the folder."""
    from transformers import PreTrainedTokenizerFast

    wrapper = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(add_bos), bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>", model_max_length=model_max_length)
    if chat_template is not None:
        wrapper.chat_template = chat_template
    wrapper.save_pretrained(folder)
    return Path(folder)
