"""Ollama model names, defined once: `[namespace/]model[:tag]`, where a name without a tag means `latest`.

Here are the default model the teachers and judges ask (config dataclasses spell it out again, for
`--help`), what a valid name is (`rlhf export --name`), the name derived from a model folder, and the
file a model's GGUF is written to.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_MODEL = "qwen2.5:7b"
DEFAULT_TAG = "latest"  # what Ollama reads a name without `:tag` as

# lowercase letters, digits, '.', '_', '-'; optionally one namespace/ and a :tag of at most 128 characters
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)?(:[a-z0-9_][a-z0-9._-]{0,127})?")


def is_valid_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None  # fullmatch: `$` would let a final newline through


def tagged(name: str) -> str:
    """`name` with its tag spelled out: `m` -> `m:latest`, which Ollama serves as the same model."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:{DEFAULT_TAG}"


def default_name(model: str) -> str:
    """A valid name from a model path: its last part, lowercased, other characters turned into '-'."""
    base = re.sub(r"[^a-z0-9._-]+", "-", Path(model.rstrip("/")).name.lower()).strip("-._")
    return base or "rlhf-model"


def file_stem(name: str) -> str:
    """The file name, less its suffix, for model `name`: `team/chip:v1` -> `chip-v1`."""
    return name.split("/")[-1].replace(":", "-")
