"""Tokenizers of the released folders, without transformers: `tokenizer.json` through the `tokenizers`
library and the PE chat template through jinja2, giving the ids transformers' `AutoTokenizer` gives.

Mirrors what `ErnieImagePipeline` asks of its tokenizers: `tokenizer(prompt, add_special_tokens=True,
truncation=True)` (truncation to `model_max_length`), `pe_tokenizer.apply_chat_template(messages,
tokenize=False, add_generation_prompt=False)` followed by `pe_tokenizer(text)`, and
`decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

# transformers' stand-in for "no limit" when a tokenizer config gives no model_max_length.
UNLIMITED_LENGTH = int(1e30)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used as given."""


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_chat_template(source: str) -> jinja2.Template:
    """The template compiled in the environment transformers renders chat templates with."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers replaces jinja's tojson, which would HTML-escape the text.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


class Tokenizer:
    """A `tokenizer.json` tokenizer with its config's special tokens, length limit and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict, chat_template: str | None = None):
        self.backend = backend
        self.special_tokens = {name: _token_content(config[name]) for name in SPECIAL_TOKEN_NAMES
                               if _token_content(config.get(name)) is not None}
        self.model_max_length = int(config.get("model_max_length") or UNLIMITED_LENGTH)
        self.chat_template = chat_template if chat_template is not None else config.get("chat_template")
        self._template = None

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """Loads `tokenizer.json`, `tokenizer_config.json` and, if present, `chat_template.jinja`."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
            raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot load ({e})") from e
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text())
            except ValueError as e:
                raise TokenizerError(f"{folder / 'tokenizer_config.json'}: not valid JSON ({e})") from e
        template_file = folder / "chat_template.jinja"
        return cls(backend, config, template_file.read_text() if template_file.is_file() else None)

    def token_id(self, name: str) -> int | None:
        """The id of a special token by role ('bos_token', 'eos_token', 'pad_token', ...), or None."""
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool = True) -> list[int]:
        """`tokenizer(text, add_special_tokens=..., truncation=...)["input_ids"]`: truncation keeps room for
        the special tokens within `model_max_length`."""
        if truncation and self.model_max_length < UNLIMITED_LENGTH:
            self.backend.enable_truncation(self.model_max_length)
        else:
            self.backend.no_truncation()
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Renders `messages` as `apply_chat_template(messages, tokenize=False, ...)` does."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)
