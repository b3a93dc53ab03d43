"""`rlhf pipeline`: base model -> preference data -> SFT -> reward model -> PPO -> eval -> export.

One YAML: top-level keys (name, seed, output_dir, base_model, language, ...) and one section per
stage holding that stage's own keys (`rlhf <stage> --help` lists them); rlhf.stages.PIPELINE names the
stages in their order, with the section and folder of each. The pipeline wires the stages
together (models, data and output folders), so a section never names a path of the run. Everything
lands in one run folder (default runs/<name>/): base/ (the tiny model, when base_model is `tiny`),
data/, sft/, reward/, ppo/, eval/, export/, each with its metrics.json, plus pipeline.json (status and
wall time per stage) and report.md.

Skipping and resuming: after a stage returns, STAGE/.stage.json records a hash of its resolved
config chained with the hashes of the stages before it. A stage whose metrics.json and completed
.stage.json match is skipped; a changed config reruns that stage and everything after it;
`--from STAGE` reruns from STAGE on. A stage interrupted mid-way (SIGKILL, crash) is continued
where it can be (data and PPO resume from their own files and checkpoints when the config is the
same) and otherwise rerun from a clean folder (the tiny model, SFT, reward, eval and export are
deterministic), so a rerun after a crash ends with the results of an uninterrupted run.

A stage folder is deleted only when the pipeline created it (it carries rlhf.io.OWNED_MARKER) or it
is empty: one holding files of the user's own is refused before any stage runs, unless
`--overwrite true`.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.config import SEED, build, field, field_name
from rlhf.errors import UserError
from rlhf.io import atomic_write_json, check_removable, is_owned, mark_owned, read_json, remove_owned_dir
from rlhf.stages import PIPELINE, load_stage

STATE_FILE = ".stage.json"
HASH_VERSION = 1  # bump when the meaning of a stage's outputs changes: every run folder reruns
# One path segment: no separator, no `..`, no leading dot (a hidden folder), nothing that breaks a line.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

OPTIONAL = {"sft", "eval", "export"}  # sections that may say `enabled: false`
RESUMABLE = {"data", "ppo"}  # continue from their own files when the config is unchanged
# Keys the pipeline sets: a section that sets them would break the wiring between stages.
WIRED: dict[str, tuple[str, ...]] = {
    "base": ("output_dir",),
    "data": ("output_dir",),
    "sft": ("model", "data", "output_dir"),
    "reward": ("model", "data", "output_dir"),
    "ppo": ("model", "reward_model", "data", "output_dir"),
    "eval": ("models", "data", "reference", "reward_model", "output_dir"),
    "export": ("model", "output_dir"),
}
# Top-level keys handed to every stage that has them, unless its section sets them.
SHARED = ("seed", "language", "dtype", "ollama_host")


@dataclass
class PipelineConfig:
    name: str = field("demo", help="run name: the run folder defaults to runs/<name>, the Ollama model to <name>")
    output_dir: str = field("", help="run folder (default runs/<name>)")
    seed: int = field(0, help="seed of every stage (a section's own seed wins)", **SEED)
    base_model: str = field("tiny", help="'tiny' (built from scratch by the tiny_model section) or a model "
                                         "folder, .gguf, short name (smollm2-135m) or Hub id")
    language: str = field("en", help="prompt language of the data: en or zh")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = field(
        None, help="dtype of the SFT, reward, PPO and eval models (null: each stage's default)")
    ollama_host: str | None = field(None, help="Ollama host(s) for the stages that talk to Ollama (null: $OLLAMA_HOST)")
    threads: int = field(0, min=0, help="torch CPU threads for every stage (0: torch's default, all cores). On a quiet "
                                 "machine all cores are fastest; when another job shares them, 1 thread is")
    from_: str | None = field(None, help="rerun from this stage on: " + ", ".join(PIPELINE))
    report: bool = field(True, help="write report.md at the end")
    overwrite: bool = field(False, help="let a stage that reruns delete its folder even when rlhf did not create "
                                        "it (no .rlhf-owned in it): the files of your own there are lost")
    tiny_model: dict = field({}, help="`rlhf tiny-model` keys (used when base_model is 'tiny')")
    data: dict = field({}, help="`rlhf data preference` keys")
    sft: dict = field({}, help="`rlhf sft` keys, plus enabled: false to start PPO from the base model")
    reward: dict = field({}, help="`rlhf reward` keys")
    ppo: dict = field({}, help="`rlhf ppo` keys")
    eval: dict = field({}, help="`rlhf eval` keys, plus enabled: false")
    export: dict = field({}, help="`rlhf export` keys, plus enabled: false")

    def validate(self) -> None:
        if self.from_ is not None and self.from_ not in PIPELINE:
            raise UserError(f"--from {self.from_!r} is not a stage; use one of {', '.join(PIPELINE)}")
        if not _RUN_NAME.fullmatch(self.name):
            raise UserError(f"name {self.name!r}: a run name is one folder name of letters, digits, '.', '_' and "
                            "'-', starting with a letter or digit (at most 128), e.g. chip-demo")

    @property
    def root(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


@dataclass
class Stage:
    name: str
    cli_name: str
    folder: Path
    cfg: Any  # the stage's config dataclass, None when disabled
    run: Any
    hash: str = ""


def _section(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    return dict(getattr(cfg, PIPELINE[name].section) or {})


def plan(cfg: PipelineConfig) -> list[Stage]:
    """Every stage's resolved config, checked before anything runs (an unknown key fails at once)."""
    root = cfg.root
    tiny = cfg.base_model.strip().lower() == "tiny"
    enabled = {}
    for name in PIPELINE:
        sec = _section(cfg, name)
        flag = sec.get("enabled", True)
        if "enabled" in sec and name not in OPTIONAL:
            raise UserError(f"pipeline: section '{PIPELINE[name].section}': the {name} stage cannot be disabled "
                            f"(only {', '.join(sorted(OPTIONAL))} can)")
        if not isinstance(flag, bool):
            raise UserError(f"pipeline: section '{PIPELINE[name].section}': key 'enabled': expected true or false")
        enabled[name] = flag
    enabled["base"] = tiny
    base = str(root / "base") if tiny else cfg.base_model
    start = str(root / "sft") if enabled["sft"] else base  # the PPO policy's start and its reference
    data, reward = str(root / "data"), str(root / "reward")
    policy = str(root / "ppo" / "policy")
    models = [f"{k}={v}" for k, v in (("base", base), ("sft", str(root / "sft")), ("ppo", policy))
              if k != "sft" or enabled["sft"]]
    wiring: dict[str, dict[str, Any]] = {
        "base": {},
        "data": {"cache_dir": str(root / "cache" / "ollama")},  # outside data/: survives a rerun of the stage
        "sft": {"model": base, "data": data},
        "reward": {"model": start, "data": data},
        "ppo": {"model": start, "reward_model": reward, "data": data},
        "eval": {"models": models, "data": data, "reference": start, "reward_model": reward},
        "export": {"model": policy, "name": _ollama_name(cfg.name), **_gguf_check(data)},
    }
    stages: list[Stage] = []
    chain = f"v{HASH_VERSION}"
    for name, (cli_name, sec_name, folder) in PIPELINE.items():
        cls, fn, _ = load_stage(cli_name)
        where = f"pipeline: section '{sec_name}'"
        sec = _section(cfg, name)
        sec.pop("enabled", None)
        for key in sec:
            if field_name(key) in WIRED[name]:  # `output-dir` too: build() reads it as output_dir
                raise UserError(f"{where}: key '{key}' is set by the pipeline (it wires the stages together); "
                                "remove it")
        sec = {field_name(k): v for k, v in sec.items()}  # so the wiring and shared keys below see `key-name` too
        fields = {f.name for f in dataclasses.fields(cls)}
        if name == "eval":  # eval's reward column is the reward PPO optimised, unless the section says otherwise
            ppo = next(s.cfg for s in stages if s.name == "ppo")
            wiring[name].update(rewards=ppo.rewards, judge_model=ppo.ollama_model)
        values: dict[str, Any] = {k: v for k, v in wiring[name].items() if k not in sec}
        for key in SHARED:
            if key in fields and key not in sec and getattr(cfg, key) is not None:
                values[key] = getattr(cfg, key)
        values.update(sec)
        values["output_dir"] = str(root / folder)
        stage_cfg = build(cls, values, where)  # validates keys, types and the stage's own rules
        if not enabled[name]:
            stages.append(Stage(name, cli_name, root / folder, None, fn))
            chain = _hash(chain, name, "disabled")
            continue
        chain = _hash(chain, name, _portable(dataclasses.asdict(stage_cfg), root))
        stages.append(Stage(name, cli_name, root / folder, stage_cfg, fn, chain))
    return stages


def _gguf_check(data: str) -> dict[str, str]:
    """Export checks its GGUF in llama.cpp on the held-out chips wherever llama-cpp-python is installed
    (the dev extra); a base install exports unchecked. `verify_data: null` in the section turns it off."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {}
    return {"verify_data": data}


def _ollama_name(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "rlhf-model"


def _portable(obj: Any, root: Path) -> Any:
    """The config with the run folder written as $RUN: a moved or renamed run folder stays valid."""
    prefix = str(root)
    if isinstance(obj, dict):
        return {k: _portable(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v, root) for v in obj]
    if isinstance(obj, str) and (obj == prefix or obj.startswith(prefix + "/") or f"={prefix}" in obj):
        return obj.replace(prefix, "$RUN")
    return obj


def _hash(prev: str, name: str, obj: Any) -> str:
    blob = json.dumps({"prev": prev, "stage": name, "config": obj}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _state(folder: Path) -> dict[str, Any]:
    try:
        state = read_json(folder / STATE_FILE)
    except (OSError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def is_done(stage: Stage) -> bool:
    state = _state(stage.folder)
    return bool(state.get("complete")) and state.get("hash") == stage.hash and (stage.folder / "metrics.json").is_file()


def check_folders(stages: list[Stage], overwrite: bool) -> None:
    """Before any stage runs: every folder a stage may delete is the pipeline's, or the run stops here."""
    for stage in stages:
        if stage.cfg is None:
            continue  # a disabled stage's folder is never touched
        if not is_owned(stage.folder) and (stage.folder / STATE_FILE).is_file():
            mark_owned(stage.folder)  # only the pipeline writes .stage.json, into a folder it emptied first
        check_removable(stage.folder, force=overwrite)


def _clean(folder: Path, overwrite: bool) -> None:
    """Start a stage from an empty folder: stale files (an old adapter beside new weights) mislead loaders."""
    remove_owned_dir(folder, force=overwrite)
    mark_owned(folder)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _skip_or_disable(stage: Stage, entry: dict[str, Any], tag: str, forced: bool) -> bool:
    """Record a disabled stage or one already done for this config; True when it does not run."""
    if stage.cfg is None:
        entry.update(status="disabled", seconds=None)
        _banner(f"{tag} {stage.name}: " + ("not used (base_model is a model, not 'tiny')"
                                           if stage.name == "base" else "disabled in the config"))
        return True
    if not forced and is_done(stage):
        entry.update(status="skipped", seconds=_state(stage.folder).get("seconds"), seconds_this_run=0.0)
        _banner(f"{tag} {stage.name}: done already for this config, skipped "
                f"(--from {stage.name} reruns it)")
        return True
    return False


def _run_stage(stage: Stage, later: list[Stage], tag: str, forced: bool, cfg: PipelineConfig,
               entry: dict[str, Any], record: dict[str, Any], record_path: Path) -> None:
    """Run one stage from a clean folder (or continue it), marking its .stage.json complete only after."""
    # Whatever follows was made from this stage's old outputs: it is no longer valid.
    for other in later:
        (other.folder / STATE_FILE).unlink(missing_ok=True)
    state = _state(stage.folder)
    resume = (stage.name in RESUMABLE and not forced and state.get("hash") == stage.hash
              and not state.get("complete"))
    if resume:
        _banner(f"{tag} {stage.name}: continuing an interrupted run in {stage.folder}")
    else:
        _clean(stage.folder, cfg.overwrite)
        _banner(f"{tag} {stage.name} -> {stage.folder}")
    atomic_write_json(stage.folder / STATE_FILE, {"hash": stage.hash, "complete": False, "stage": stage.name})
    t0 = time.time()
    try:
        stage.run(stage.cfg)
    except BaseException:
        entry.update(status="failed", seconds_this_run=round(time.time() - t0, 2))
        atomic_write_json(record_path, record)
        raise
    finally:
        gc.unfreeze()  # PPO freezes its models' objects for speed; let them be collected now
        gc.collect()
    seconds = round(time.time() - t0, 2)
    if not (stage.folder / "metrics.json").is_file():
        raise UserError(f"stage {stage.name} returned without writing {stage.folder / 'metrics.json'}")
    atomic_write_json(stage.folder / STATE_FILE, {"hash": stage.hash, "complete": True, "stage": stage.name,
                                                  "seconds": seconds, "resumed": resume})
    entry.update(status="ran", seconds=seconds, seconds_this_run=seconds, resumed=resume)
    atomic_write_json(record_path, record)
    _banner(f"{stage.name}: done in {seconds:.1f} s")


def _finish(cfg: PipelineConfig, record: dict[str, Any], record_path: Path, t_run: float) -> dict[str, Any]:
    """Totals into pipeline.json, then the report and the run's metrics.json."""
    root = cfg.root
    record["seconds_this_run"] = round(time.time() - t_run, 2)
    record["stage_seconds_total"] = round(sum(e.get("seconds") or 0 for e in record["stages"].values()), 2)
    atomic_write_json(record_path, record)
    out: dict[str, Any] = {"output_dir": str(root), "stages": {k: v["status"] for k, v in record["stages"].items()},
                           "seconds_this_run": record["seconds_this_run"]}
    if cfg.report:
        from rlhf.report import write_report

        out["report"] = str(write_report(root))
    from rlhf.io import write_metrics

    write_metrics(root, {**out, "stage_seconds": {k: v.get("seconds") for k, v in record["stages"].items()}})
    print(f"\npipeline {cfg.name}: {record['seconds_this_run']:.1f} s this run "
          f"({record['stage_seconds_total']:.1f} s of stage time in all)")
    if "report" in out:
        print(f"report: {out['report']}")
    return out


def run(cfg: PipelineConfig) -> dict[str, Any]:
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    stages = plan(cfg)
    check_folders(stages, cfg.overwrite)
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / "pipeline.json"
    record: dict[str, Any] = {"name": cfg.name, "output_dir": str(root), "base_model": cfg.base_model,
                              "stages": {}, "order": list(PIPELINE)}
    t_run = time.time()
    forced = False
    total = len(stages)
    for i, stage in enumerate(stages, start=1):
        forced = forced or cfg.from_ == stage.name
        entry: dict[str, Any] = {"folder": stage.folder.name, "hash": stage.hash or None}
        record["stages"][stage.name] = entry
        tag = f"[{i}/{total}]"
        if not _skip_or_disable(stage, entry, tag, forced):
            _run_stage(stage, stages[i:], tag, forced, cfg, entry, record, record_path)
    return _finish(cfg, record, record_path, t_run)
