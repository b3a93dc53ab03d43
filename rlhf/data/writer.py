"""Append-only JSONL writing that survives SIGKILL: rows are whole lines, written in order.

Each row is one `os.write` on a file opened with O_APPEND, in the order the caller produces rows,
across all files. A kill therefore leaves, over all files together, a prefix of the rows in
production order plus at most one torn last line, which `recover_jsonl` drops. `flush()` fsyncs
every file (the data stage calls it after each batch) so a power loss costs at most one batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlhf.io import iter_jsonl, truncate_torn_tail


def recover_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSONL file written by AppendWriter, after dropping a torn tail (if any)."""
    path = Path(path)
    if not path.exists():
        return []
    truncate_torn_tail(path)
    return list(iter_jsonl(path))


class AppendWriter:
    """`writer.write("train", row)` appends one line to the file registered as "train"."""

    def __init__(self, paths: dict[str, str | os.PathLike]) -> None:
        self._fds: dict[str, int] = {}
        self._dirty: set[str] = set()  # fsync only what was written since the last flush
        for name, path in paths.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fds[name] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, name: str, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        fd = self._fds[name]
        self._dirty.add(name)
        view = memoryview(data)
        while view:  # os.write may write less than asked; finish the line before anything else
            view = view[os.write(fd, view):]

    def flush(self) -> None:
        for name in self._dirty:
            os.fsync(self._fds[name])
        self._dirty.clear()

    def close(self) -> None:
        self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> AppendWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fds:
            self.close()
