"""Loading and checking the preference / SFT files every training stage reads.

Bad rows are reported with file and line (1-based) and what to fix, before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.io import read_jsonl

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
SFT_COLUMNS = ("prompt", "completion")
PROMPT_COLUMNS = ("prompt",)


def resolve_split(data: str, split: str) -> Path:
    """`data` is a folder written by `rlhf data preference` or a .jsonl file."""
    path = Path(data)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"data file not found: {path} (run `rlhf data preference --output_dir DIR` first, "
                        "or pass --data DIR)")
    return path


def check_messages(value: Any, path: Path, line: int, column: str) -> None:
    if not isinstance(value, list) or not value:
        raise UserError(f"{path}: row {line}: column '{column}' must be a non-empty list of "
                        '{"role": ..., "content": ...} messages')
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise UserError(f"{path}: row {line}: {column}[{i}] needs a string 'role'")
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{path}: row {line}: {column}[{i}].content must be a non-empty string")


def load_rows(path: Path, columns: tuple[str, ...], *, tokenizer: Any = None,
              max_length: int | None = None) -> list[dict[str, Any]]:
    """Read a JSONL split, check every row; with a tokenizer also check the prompt fits the context."""
    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path}: no rows")
    for line, row in enumerate(rows, start=1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise UserError(f"{path}: row {line}: missing column '{missing[0]}' (each row needs {', '.join(columns)})")
        for c in columns:
            check_messages(row[c], path, line, c)
        if tokenizer is not None and max_length:
            from rlhf.models.tokens import chat_ids

            n = len(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True))
            if n >= max_length:
                raise UserError(f"{path}: row {line}: the prompt is {n} tokens, longer than the model's context "
                                f"({max_length}); shorten it or raise max_length")
    return rows


def model_context(tokenizer: Any, model_config: Any = None) -> int:
    """The longest sequence the model takes (tokenizer limits are often a huge placeholder)."""
    limits = [getattr(model_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 10_000_000]
    return min(limits) if limits else 4096
