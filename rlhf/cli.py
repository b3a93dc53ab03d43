"""`rlhf <stage> [--config FILE.yaml] [--key value ...]`: one entry point for every stage.

Each stage lives in its own module as a config dataclass and a `run(cfg) -> metrics` function that
writes its outputs (and `metrics.json`) under `cfg.output_dir`; rlhf.stages names them all. Modules
are imported lazily so `rlhf --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rlhf.errors import UserError
from rlhf.stages import STAGES, load_stage


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: rlhf <stage> [--config FILE.yaml] [--key value ...]", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {entry.summary}" for name, entry in STAGES.items()]
    lines += ["", "`rlhf <stage> --help` lists the keys of a stage. Every stage writes into --output_dir",
              "and leaves its results in OUTPUT_DIR/metrics.json."]
    return "\n".join(lines)


def find_stage(argv: list[str]) -> tuple[str, list[str]]:
    for n_words in (2, 1):
        name = " ".join(argv[:n_words])
        if len(argv) >= n_words and name in STAGES:
            return name, argv[n_words:]
    group = [s for s in STAGES if argv and s.split()[0] == argv[0]]
    if group:
        raise UserError(f"'rlhf {argv[0]}' needs one of: {', '.join(s.split()[1] for s in group)}")
    raise UserError(f"unknown stage {argv[0]!r}; run `rlhf --help` for the list")


def run_stage(name: str, argv: list[str]) -> dict[str, Any]:
    from rlhf import config as config_mod

    cfg_cls, fn, doc = load_stage(name)
    if any(a in ("-h", "--help") for a in argv):
        print(config_mod.help_text(cfg_cls, name, doc))
        return {}
    cfg = config_mod.parse(cfg_cls, argv, name)
    out = getattr(cfg, "output_dir", "") or ""
    created = _missing_folders(out) if out else []
    before = _top_level(out) if out else {}
    old_record = _read_record(out) if out else None
    try:
        if out:
            record_config(cfg, name, out)
        return fn(cfg) or {}
    except UserError:
        # refused before producing anything (a bad host, key or file the stage checks itself): leave the
        # output folder as it was, and no folder this run created behind
        if out:
            _undo_record(out, created, before, old_record)
        raise


RECORDED_CONFIG = "rlhf_config.yaml"


def _missing_folders(out: str) -> list[str]:
    """`out` and those of its parents that do not exist yet, deepest first (what recording creates)."""
    missing: list[str] = []
    path = os.path.abspath(out)
    while not os.path.lexists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _top_level(out: str) -> dict[str, tuple[int, int]]:
    """The entries of `out` (name -> mtime, size), the record left out: what tells whether a refused
    stage had written anything before it refused ({} when there is no such folder)."""
    try:
        with os.scandir(out) as entries:
            stats = {e.name: e.stat(follow_symlinks=False) for e in entries if e.name != RECORDED_CONFIG}
    except OSError:
        return {}
    return {name: (st.st_mtime_ns, st.st_size) for name, st in stats.items()}


def _read_record(out: str) -> tuple[bytes, int, int] | None:
    """The record a previous run left (bytes, atime, mtime), to put back if this run is refused."""
    path = os.path.join(out, RECORDED_CONFIG)
    try:
        with open(path, "rb") as f:
            data = f.read()
        st = os.stat(path)
    except OSError:
        return None
    return data, st.st_atime_ns, st.st_mtime_ns


def _undo_record(out: str, created: list[str], before: dict[str, tuple[int, int]],
                 old_record: tuple[bytes, int, int] | None) -> None:
    """Undo record_config when the stage wrote nothing else: the record as it was (none, or the previous
    run's), then the folders this run created. A stage that did work keeps its record beside that work."""
    if _top_level(out) != before:
        return
    record = os.path.join(out, RECORDED_CONFIG)
    try:
        if old_record is None:
            os.remove(record)
        else:
            data, atime, mtime = old_record
            tmp = record + ".restore.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, record)
            os.utime(record, ns=(atime, mtime))
    except OSError:
        pass  # never written (an unwritable folder), or not ours to fix: the refusal line says what matters
    for folder in created:
        try:
            os.rmdir(folder)  # only empty ones: anything the stage wrote stays
        except OSError:
            return


def _unwritable(out: str, err: OSError) -> UserError:
    """One line for an output folder that cannot be created or written."""
    path = os.path.abspath(out)
    while not os.path.lexists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        why = f"{path} is a file, not a folder"
    else:
        why = err.strerror or type(err).__name__
        if err.filename:
            why += f": {err.filename}"
    return UserError(f"--output_dir {out}: cannot create the folder or write in it ({why}); "
                     "pass a folder you can write to")


def record_config(cfg: Any, stage: str, out: str) -> None:
    """OUTPUT_DIR/rlhf_config.yaml: every setting of the run, after the YAML and the command line,
    written (atomically, by the first process) before the stage starts, so a run in progress, a
    killed one and a resumed one all show what they ran with; `--config` takes it back as is."""
    import json

    import yaml

    from rlhf.config import to_dict
    from rlhf.io import atomic_write_text
    from rlhf.training import world_info

    if world_info()["rank"] != 0:
        return
    values = json.loads(json.dumps(to_dict(cfg), default=str))  # tuples -> lists, paths -> str: plain YAML
    try:
        atomic_write_text(os.path.join(out, RECORDED_CONFIG),
                          f"# rlhf {stage}: the settings of the last run into this folder\n"
                          + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    except OSError as e:
        raise _unwritable(out, e) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from rlhf import __version__

        print(__version__)
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # before anything creates accelerate's state
        from rlhf.training import use_cpu_backend_when_no_gpu

        use_cpu_backend_when_no_gpu()
    try:
        name, rest = find_stage(argv)
        run_stage(name, rest)
    except UserError as e:
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def entry_point(argv: list[str] | None = None) -> int:
    """`rlhf --help | head` must not end in a BrokenPipeError traceback."""
    try:
        return main(argv)
    except BrokenPipeError:
        sys.stderr.close()
        return 0


def script_main(stage: str) -> None:
    """Entry point for scripts/<stage>.py (run by python, torchrun or accelerate launch)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(stage.split() + sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(entry_point())
