"""The output folder of `rlhf data preference`: which run it holds, and what that run left.

args.json records the arguments that shape the rows; a run into a folder made with other ones is
refused (writing nothing) unless --overwrite. A run into its own folder resumes: the rows and
skipped chips already there are read back (torn tails dropped) and only the missing rows are asked.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.chips import ChipSpec
from rlhf.data.pairs import SPLITS
from rlhf.data.rejections import STRATEGIES
from rlhf.data.writer import recover_jsonl
from rlhf.errors import UserError
from rlhf.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from rlhf.data.preference import PreferenceConfig

FORMAT_VERSION = 1
# Keys that shape the rows: a restart must use the same ones. The rest (hosts, concurrency...) may change.
SEMANTIC_KEYS = ("teacher", "variant", "n", "seed", "language", "test_fraction", "sft_n", "sft_label_noise",
                 "rejection_weights", "rule", "ollama_model")
# teacher_log.jsonl: request counts per batch rather than per request. This stage never writes it; where a
# folder holds one, its counts are added to requests.jsonl's in the manifest, so no request goes uncounted.
ROW_FILES = ("train.jsonl", "test.jsonl", "sft.jsonl", "skipped.jsonl", "requests.jsonl", "teacher_log.jsonl")


def semantic_args(cfg: PreferenceConfig) -> dict[str, Any]:
    args = {k: getattr(cfg, k) for k in SEMANTIC_KEYS}
    args["sft_n"] = cfg.n if cfg.sft_n is None else cfg.sft_n
    total = sum(cfg.rejection_weights.values())
    args["rejection_weights"] = {s: cfg.rejection_weights.get(s, 0) / total for s in STRATEGIES}
    if cfg.teacher != "ollama":
        args["ollama_model"] = None
    return {"format_version": FORMAT_VERSION, **args}


def check_dir(out: Path, args: dict[str, Any], overwrite: bool) -> bool:
    """Refuse to mix two different runs in one folder, writing nothing. True when this run starts the
    folder (afresh, or over with `overwrite`); False when it resumes the run already there."""
    args_path = out / "args.json"
    if overwrite:
        return True
    if args_path.exists():
        try:
            old = read_json(args_path)
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{args_path} is unreadable; delete the folder or pass --overwrite true") from None
        diff = [k for k in sorted(set(old) | set(args)) if old.get(k) != args.get(k)]
        if diff:
            k = diff[0]
            raise UserError(f"{out} holds a run made with other arguments ({k}: {old.get(k)!r} there, "
                            f"{args.get(k)!r} now); use a new --output_dir or pass --overwrite true")
        return False
    present = [f for f in ROW_FILES if (out / f).exists()]
    if present:
        raise UserError(f"{out} holds {present[0]} but no args.json: not a folder of this stage; "
                        "use a new --output_dir or pass --overwrite true")
    return True


def prepare_dir(out: Path, args: dict[str, Any], overwrite: bool) -> None:
    """check_dir, then start the folder when this run starts it (with overwrite: over, keeping the cache)."""
    if not check_dir(out, args, overwrite):
        return
    if overwrite:
        for name in (*ROW_FILES, "manifest.json", "metrics.json", "args.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "args.json", args)


def _spec_of(row: dict[str, Any], where: str) -> ChipSpec:
    try:
        return ChipSpec(int(row["length"]), int(row["width"]), int(row["height"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: a row lacks integer length/width/height; delete the folder or pass "
                        "--overwrite true") from None


@dataclass
class Progress:
    """What a previous run (killed or finished) left: each chip written with its split, rows per split
    and the chips skipped. The stage adds to it as it writes."""

    done: dict[ChipSpec, str]
    counts: Counter[str]
    skipped: set[ChipSpec]


def recover(out: Path, quota: dict[str, int]) -> Progress:
    """Read back the rows and skipped chips in `out`, dropping torn tails; refuse a folder edited by hand."""
    done: dict[ChipSpec, str] = {}
    counts: Counter[str] = Counter()
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        for row in recover_jsonl(path):
            spec = _spec_of(row, str(path))
            if spec in done:
                raise UserError(f"{path}: chip {spec.key()} appears twice; the folder was edited by hand: "
                                "pass --overwrite true")
            done[spec] = split
            counts[split] += 1
    skipped_rows = recover_jsonl(out / "skipped.jsonl")
    skipped = {_spec_of(r, str(out / "skipped.jsonl")) for r in skipped_rows}
    recover_jsonl(out / "requests.jsonl")  # drop its torn tail too, before the teacher appends to it
    over = [s for s in SPLITS if counts[s] > quota[s]]
    if over:
        raise UserError(f"{out / (over[0] + '.jsonl')} has {counts[over[0]]} rows, more than the {quota[over[0]]} "
                        "asked; pass --overwrite true")
    return Progress(done, counts, skipped)
