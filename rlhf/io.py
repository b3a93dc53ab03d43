"""Atomic and append-only file writes: nothing already produced is lost when a run dies. Folders
are deleted only when rlhf created them (they carry OWNED_MARKER): a user's own files never are."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results should be readable like any file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_metrics(output_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Every stage leaves its results in OUTPUT_DIR/metrics.json."""
    path = Path(output_dir) / "metrics.json"
    atomic_write_json(path, metrics)
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append whole lines and fsync: a kill leaves at most one torn last line, which readers drop."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the rows of a JSONL file. A bad line raises an error naming file and line, except a
    torn final line (no newline) when `tolerate_torn_tail`: that is what a killed writer leaves."""
    from rlhf.errors import UserError

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; pass an existing .jsonl file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass a .jsonl file") from None
    except PermissionError:
        raise UserError(f"{path}: no permission to read it; fix its permissions or pass another file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); pass a .jsonl file") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and i == len(lines) and not line.endswith("\n"):
                return
            raise UserError(f"{path}: line {i} is not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {i} is not a JSON object")
        yield row


def read_jsonl(path: str | os.PathLike, **kw: Any) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, **kw))


def truncate_torn_tail(path: str | os.PathLike) -> int:
    """Drop a final line without newline (left by a killed writer). Returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


# -- folders rlhf created ------------------------------------------------------------------------
OWNED_MARKER = ".rlhf-owned"
OVERWRITE_FLAG = "--overwrite true"  # every stage's option to delete a folder rlhf did not write


def mark_owned(path: str | os.PathLike) -> Path:
    """Create folder `path` (if needed) and mark it as written by rlhf, so a later run may delete it.
    Only the marker's presence counts: a kill while writing it leaves it empty, which is enough."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / OWNED_MARKER, "w", encoding="utf-8") as f:
        f.write("rlhf wrote this folder; it deletes and rewrites it when the step that made it reruns\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def is_owned(path: str | os.PathLike) -> bool:
    """A real folder (not a link: rlhf makes none) that carries the marker."""
    path = Path(path)
    return not path.is_symlink() and path.is_dir() and (path / OWNED_MARKER).is_file()


def check_removable(path: str | os.PathLike, flag: str = OVERWRITE_FLAG, *, force: bool = False) -> None:
    """Raise UserError unless `path` is absent, an empty folder (nothing to lose), or rlhf's own;
    `flag` is the option that allows deleting it anyway (`force`), named in the message."""
    from rlhf.errors import UserError

    path = Path(path)
    if force or not (path.exists() or path.is_symlink()) or is_owned(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise UserError(f"{path} is a {'link' if path.is_symlink() else 'file'} where rlhf writes a folder; "
                        f"move it away, use another --output_dir, or pass {flag} to delete it")
    if not any(path.iterdir()):
        return
    raise UserError(f"{path} holds files rlhf did not write (no {OWNED_MARKER} in it); move them away, "
                    f"use another --output_dir, or pass {flag} to delete them")


def remove_owned_dir(path: str | os.PathLike, flag: str = OVERWRITE_FLAG, *, force: bool = False) -> None:
    """Delete folder `path` if check_removable allows it, else raise its UserError. The marker goes
    last, so a folder whose deletion was killed half-way still carries it and the rerun finishes it."""
    path = Path(path)
    check_removable(path, flag, force=force)
    if path.is_symlink() or path.is_file():  # only with force: the link itself, never what it points to
        path.unlink()
        return
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.name == OWNED_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / OWNED_MARKER).unlink(missing_ok=True)
    path.rmdir()
