"""`rlhf data preference`: chip-advice preference pairs (+ an SFT split) from a teacher.

Writes OUTPUT_DIR/{train,test,sft}.jsonl in TRL's conversational format, plus manifest.json and
metrics.json. Rows of train/test:
  {"prompt": [user], "chosen": [assistant], "rejected": [assistant], "length", "width", "height",
   "teacher_action", "teacher_model", "rejection_strategy"}
and of sft: {"prompt": [user], "completion": [assistant], "length", "width", "height",
   "teacher_action", "sft_action"}.

`chosen` is the teacher's action and reason as canonical JSON. `rejected` is built by one of these
strategies, drawn per row with `rejection_weights` (recorded in `rejection_strategy`):
  wrong_action       another action with that action's plausible reason (well-formed JSON)
  mismatched_reason  the teacher's action with another action's reason
  corrupted_reason   the teacher's action, its reason with words dropped or repeated
  malformed_json     the chosen answer broken: truncated, unbalanced or single-quoted
  missing_action     JSON with a reason but no action
  off_topic          an unrelated sentence
The reason-based negatives keep a policy from gaming the reward model through the reason text.

The SFT answers are well-formed but follow the teacher only with probability 1 - sft_label_noise
(else an action drawn uniformly), so SFT teaches the format and RL has something to improve.

Determinism and resuming: chips come from one seeded stream of distinct specs; each chip's split,
strategy and noise come from an RNG seeded by (seed, chip), and a chip's split depends only on the
rows before it. Rows are appended in stream order (see rlhf.data.writer), so a run killed at any
point and restarted with the same arguments drops a torn tail, skips the chips already written or
skipped (skipped.jsonl), and ends byte-identical to an uninterrupted run. With the Ollama teacher a
chip whose answer never conforms is skipped, logged with its reason, and the next chip takes its
place. Any other failure (unreachable, timeout or 5xx after all retries, model missing...) is the
host's, not the chip's: the run stops with the rows kept and that chip not marked, so a rerun asks it
again and resumes; so do 50 non-conforming answers in a row. Every request is appended to
requests.jsonl as it is sent, so the manifest's request counts include those of killed runs. The arguments
that shape the data are kept in args.json; another run into the same folder with different ones is
refused unless --overwrite true.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.chips import DIM_MAX, DIM_MIN, LANGUAGES, RULES, ChipSpec
from rlhf.config import SEED, field
from rlhf.data.failure_policy import host_failure, too_many_skips
from rlhf.data.manifest import build_manifest
from rlhf.data.pairs import SPLITS, build_row, chip_rng, choose_split, spec_stream
from rlhf.data.rejections import DEFAULT_WEIGHTS, STRATEGIES
from rlhf.data.resume import Progress, check_dir, prepare_dir, recover, semantic_args
from rlhf.data.writer import AppendWriter
from rlhf.errors import UserError
from rlhf.io import atomic_write_json, write_metrics


@dataclass
class PreferenceConfig:
    output_dir: str = field("data/preference", help="folder for train/test/sft.jsonl, manifest.json, metrics.json")
    teacher: str = field("rule", help="rule (embedded, deterministic) or ollama (a model served by Ollama)")
    variant: str = field("dims", help="task variant; preference data exists for dims ([length, width, height])")
    n: int = field(1000, help="train + test rows")
    seed: int = field(0, help="same seed, same rows", **SEED)
    language: str = field("en", help="prompt and reason language: en or zh")
    test_fraction: float = field(0.1, help="share of the n rows held out as test", min=0, lt=1)
    sft_n: int | None = field(None, help="rows of the SFT split (default: n)", min=0)
    sft_label_noise: float = field(0.8, help="probability an SFT answer's action is drawn uniformly instead of "
                                             "the teacher's (1.0 = uniform random)", min=0, max=1)
    rejection_weights: dict = field(dict(DEFAULT_WEIGHTS), help="weight of each rejection strategy")
    rule: str = field("height", help="rule of the rule teacher")
    ollama_host: str | None = field(None, help="Ollama host(s), comma-separated (default $OLLAMA_HOST or "
                                               "http://127.0.0.1:11434)")
    ollama_model: str = field("qwen2.5:7b", help="model the Ollama teacher asks")
    concurrency: int = field(4, help="concurrent Ollama requests per host", min=1)
    timeout: float = field(60.0, help="seconds per Ollama request", gt=0)
    retries: int = field(3, help="retries of a failed Ollama request (5xx, timeout, non-conforming answer)", min=0)
    backoff: float = field(0.5, help="first retry delay in seconds (doubles each retry)", min=0)
    cache_dir: str | None = field(None, help="Ollama answer cache (default OUTPUT_DIR/ollama_cache)")
    batch_size: int = field(256, help="chips asked per round (does not change the rows)", min=1)
    overwrite: bool = field(False, help="start over in an output_dir that holds a run with other arguments")
    progress: bool = field(False, help="show a progress bar for Ollama requests")

    def validate(self) -> None:
        if self.variant != "dims":
            raise UserError(f"--variant {self.variant!r} has no preference data: use --variant dims "
                            "(the env variant is tabular: `rlhf data tabular --variant env`)")
        if self.teacher not in ("rule", "ollama"):
            raise UserError(f"--teacher {self.teacher!r} is unknown: use rule or ollama")
        if self.language not in LANGUAGES:
            raise UserError(f"--language {self.language!r} is unknown: use one of {', '.join(LANGUAGES)}")
        if self.rule not in RULES:
            raise UserError(f"--rule {self.rule!r} is unknown: use one of {', '.join(RULES)}")
        if self.n <= 0:
            raise UserError(f"--n must be a positive number of rows, got {self.n}")
        if self.n - round(self.n * self.test_fraction) < 1:
            raise UserError(f"--n {self.n} with --test_fraction {self.test_fraction} leaves no train rows; raise --n")
        universe = (DIM_MAX - DIM_MIN + 1) ** 3
        if self.n + (self.n if self.sft_n is None else self.sft_n) > universe:
            raise UserError(f"--n + --sft_n exceeds the {universe} distinct chips there are; ask for fewer rows")
        unknown = [k for k in self.rejection_weights if k not in STRATEGIES]
        if unknown:
            raise UserError(f"--rejection_weights: unknown strategy {unknown[0]!r}; use {', '.join(STRATEGIES)}")
        for key, w in self.rejection_weights.items():
            # nan passes `w < 0` and inf makes the shares nan: both would skew the draw silently
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise UserError(f"--rejection_weights: the weight of {key!r} must be a finite number >= 0, got "
                                f"{w!r}; e.g. '{{wrong_action: 1, off_topic: 1}}'")
        if sum(self.rejection_weights.values()) <= 0:
            raise UserError("--rejection_weights: weights must be numbers >= 0 with a positive sum, e.g. "
                            "'{wrong_action: 1, off_topic: 1}'")


class _LazyTeacher:
    """The teacher, made on first use: a resumed run with every row written never asks (nor checks) a host."""

    def __init__(self, cfg: PreferenceConfig, out: Path, teacher: Any = None) -> None:
        self.cfg, self.out, self.teacher = cfg, out, teacher

    def get(self) -> Any:
        if self.teacher is None:
            self.teacher = _make_teacher(self.cfg, self.out)
        return self.teacher

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()


def run(cfg: PreferenceConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    args = semantic_args(cfg)
    # A run that starts the folder asks its teacher first (the Ollama teacher checks its hosts), so a
    # refused host leaves no folder or args.json behind; a resumed run asks it only if rows are missing.
    teacher = _LazyTeacher(cfg, out, _make_teacher(cfg, out) if check_dir(out, args, cfg.overwrite) else None)
    try:
        prepare_dir(out, args, cfg.overwrite)
        n_test = round(cfg.n * cfg.test_fraction)
        quota = {"train": cfg.n - n_test, "test": n_test, "sft": args["sft_n"]}
        progress = recover(out, quota)
        resumed = sum(progress.counts.values())
        _fill(cfg, out, quota, progress, teacher)
    finally:
        teacher.close()
    return _finish(cfg, out, args, quota, resumed, t0)


def _fill(cfg: PreferenceConfig, out: Path, quota: dict[str, int], progress: Progress,
          teacher: _LazyTeacher) -> None:
    """Ask for chips batch by batch until every split holds its quota, appending rows in stream order."""
    need = {s: quota[s] - progress.counts[s] for s in SPLITS}
    in_a_row = 0  # chips skipped in a row: a teacher that never conforms must not walk all 10^6 chips
    stream = spec_stream(cfg.seed)
    writer = AppendWriter({**{s: out / f"{s}.jsonl" for s in SPLITS}, "skipped": out / "skipped.jsonl"})
    try:
        while sum(need.values()) > 0:
            batch = _next_batch(stream, progress, min(cfg.batch_size, sum(need.values())))
            answers = teacher.get().advise_many(batch, cfg.language)
            stop, in_a_row = _take_answers(cfg, batch, answers, teacher.get(), writer, progress, need, in_a_row)
            writer.flush()
            if stop:
                kept = sum(quota.values()) - sum(need.values())
                raise UserError(f"{stop}; the {kept} rows written are kept: rerun the same command to resume")
    finally:
        writer.close()


def _next_batch(stream: Iterator[ChipSpec], progress: Progress, want: int) -> list[ChipSpec]:
    # Exactly as many chips as rows still missing: every chip asked is then consumed in order
    # (written or skipped), which keeps the failure counts exact and the order resumable.
    batch: list[ChipSpec] = []
    for spec in stream:
        if spec not in progress.done and spec not in progress.skipped:
            batch.append(spec)
            if len(batch) == want:
                break
    if not batch:
        raise UserError("ran out of distinct chips before the splits were full; ask for fewer rows")
    return batch


def _take_answers(cfg: PreferenceConfig, batch: list[ChipSpec], answers: list[Any], teacher: Any,
                  writer: AppendWriter, progress: Progress, need: dict[str, int],
                  in_a_row: int) -> tuple[str | None, int]:
    """Write each answered chip's row, skip a non-conforming one; the reason to stop, if any, and the skip run."""
    stop: str | None = None
    for spec, answer in zip(batch, answers):
        if answer.advice is None:
            reason = answer.failure or "unknown"
            stop = host_failure(reason, spec, cfg, teacher)
            if stop is not None:
                break
            writer.write("skipped", {"length": spec.length, "width": spec.width, "height": spec.height,
                                     "reason": reason})
            progress.skipped.add(spec)
            in_a_row += 1
            stop = too_many_skips(in_a_row, reason, cfg)
            if stop is not None:
                break
            continue
        in_a_row = 0
        rng = chip_rng(cfg.seed, spec)
        split = choose_split(rng.random(), need)
        writer.write(split, build_row(split, spec, answer.advice, rng, cfg, teacher.model_name))
        progress.done[spec] = split
        need[split] -= 1
    return stop, in_a_row


def _finish(cfg: PreferenceConfig, out: Path, args: dict[str, Any], quota: dict[str, int], resumed: int,
            t0: float) -> dict[str, Any]:
    """manifest.json and metrics.json, read back from the files; one line on stdout."""
    manifest = build_manifest(cfg, out, args, quota)
    manifest["resumed_rows"] = resumed
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(out / "manifest.json", manifest)
    metrics = {"rows": {s: manifest["splits"][s] for s in SPLITS}, "n": cfg.n, "teacher": manifest["teacher"],
               "teacher_model": manifest["teacher_model"], "skipped": sum(manifest["failures"].values()),
               "failures": manifest["failures"], "requests": manifest["requests"],
               "cache_hits": manifest["cache_hits"], "resumed_rows": resumed, "seconds": manifest["seconds"]}
    write_metrics(out, metrics)
    rows = ", ".join(f"{s} {manifest['splits'][s]}" for s in SPLITS)
    print(f"preference data ({manifest['teacher_model']}): {rows} rows, {metrics['skipped']} chips skipped, "
          f"{manifest['seconds']:.1f} s -> {out}")
    return metrics


def _make_teacher(cfg: PreferenceConfig, out: Path) -> Any:
    from rlhf.teachers import make_teacher

    if cfg.teacher == "rule":
        return make_teacher("rule", rule=cfg.rule)
    return make_teacher("ollama", model=cfg.ollama_model, hosts=cfg.ollama_host, concurrency=cfg.concurrency,
                        timeout=cfg.timeout, retries=cfg.retries, backoff=cfg.backoff,
                        cache_dir=cfg.cache_dir or (out / "ollama_cache"), progress=cfg.progress,
                        request_log=out / "requests.jsonl")
