"""Tokenizer folders built in the tests (the released tokenizer files cannot be downloaded here)."""

from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
# Shaped like the PE's template as third-party ports describe it (the real one is not available here).
PE_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}"
    "{%- set system_message = '你是一个提示词改写助手。Rewrite the prompt as JSON.' %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}[SYSTEM_PROMPT]{{ system_message }}[/SYSTEM_PROMPT]\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}[INST]{{ message['content'] }}[/INST]\n"
    "    {%- elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n"
    "    {%- else %}{{ raise_exception('unsupported role ' + message['role']) }}{%- endif %}\n"
    "{%- endfor %}"
)
CORPUS = [
    "a red circle at the top left and a blue square at the bottom right",
    "a photo of a cat sitting on a wooden table, soft light, 35mm",
    '{"prompt": "a poster with the word ERNIE", "width": 1024, "height": 1024}',
    "一只可爱的小猫坐在窗台上，阳光明媚",
    "rewritten_prompt: a highly detailed illustration of a lighthouse at dusk",
] * 4


def build_tokenizer(add_bos: bool, vocab_size: int = 400) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer trained on a small corpus; `add_bos` gives it a BOS post-processor."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return tokenizer


def save_tokenizer(folder: Path, add_bos: bool, model_max_length: int = 2048, chat_template: str | None = None):
    """Saves a tokenizer folder the way transformers does (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) and returns the folder."""
    from transformers import PreTrainedTokenizerFast

    wrapper = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(add_bos), bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>", model_max_length=model_max_length)
    if chat_template is not None:
        wrapper.chat_template = chat_template
    wrapper.save_pretrained(folder)
    return Path(folder)
