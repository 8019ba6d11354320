"""Reading and writing model configs that mirror a reference `config.json`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


class JsonConfig:
    """Mixin for frozen dataclass configs whose field names are those of the reference `config.json`."""

    KIND = "model"  # names the config in error messages

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Builds from a `config.json` dict; `_`-prefixed bookkeeping keys are ignored, unknown keys refused."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"{cls.KIND} config has unknown keys {unknown}")
        return cls(**{k: v for k, v in values.items() if k in fields})

    @classmethod
    def from_json_file(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples as lists), as the reference writes them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
