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

import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.chips import (
    ACTIONS,
    DIM_MAX,
    DIM_MIN,
    LANGUAGES,
    RULES,
    Advice,
    ChipSpec,
    dims_prompt,
    format_advice,
    rule_reason,
)
from rlhf.config import SEED, field
from rlhf.data.writer import AppendWriter, recover_jsonl
from rlhf.errors import UserError
from rlhf.io import atomic_write_json, read_json, write_metrics
from rlhf.teachers.ollama import CONTENT_FAULTS, read_request_log

SPLITS = ("train", "test", "sft")
STRATEGIES = ("wrong_action", "mismatched_reason", "corrupted_reason", "malformed_json", "missing_action", "off_topic")
# Half the pairs teach the rule itself (wrong_action): format errors are easy to learn from few
# pairs, the rule is not. Measured on the tiny model, 1000 rows, 8 reward epochs: with
# 0.35/0.15/0.15/0.15/0.1/0.1 the reward model ranked the teacher's action first on 80% of held-out
# chips and PPO learned to game it (always no_change); with these weights 95% (pair accuracy 0.99).
DEFAULT_WEIGHTS = {"wrong_action": 0.5, "mismatched_reason": 0.2, "corrupted_reason": 0.1,
                   "malformed_json": 0.1, "missing_action": 0.05, "off_topic": 0.05}
FORMAT_VERSION = 1
# Keys that shape the rows: a restart must use the same ones. The rest (hosts, concurrency...) may change.
SEMANTIC_KEYS = ("teacher", "variant", "n", "seed", "language", "test_fraction", "sft_n", "sft_label_noise",
                 "rejection_weights", "rule", "ollama_model")
# Failures of the host rather than of the answer (every tag but CONTENT_FAULTS): the run stops (rows
# kept) instead of skipping the chip, which would then be lost for good and change the rerun's chips.
FATAL = {"unreachable": "start it with `ollama serve` or fix --ollama_host",
         "timeout": "no answer within --timeout {timeout:g} s in {attempts}; raise --timeout or lower --concurrency",
         "connection": "the connection kept breaking; check the host",
         "model_not_found": "run `ollama pull {model}` on every host",
         "http_5xx": "the server kept answering 5xx; check its log",
         "http_429": "the server kept refusing (429); lower --concurrency",
         "http_4xx": "the server refused the request; check --ollama_model"}
MAX_SKIPS_IN_A_ROW = 50
# teacher_log.jsonl: request counts per batch rather than per request. This stage never writes it; where a
# folder holds one, its counts are added to requests.jsonl's in the manifest, so no request goes uncounted.
ROW_FILES = ("train.jsonl", "test.jsonl", "sft.jsonl", "skipped.jsonl", "requests.jsonl", "teacher_log.jsonl")

OFF_TOPIC = {
    "en": ["The weather is lovely today; let's go for a walk.", "My favourite recipe uses three eggs and flour.",
           "The train to the city leaves at nine.", "Cats sleep for most of the day.",
           "This novel has a surprising ending."],
    "zh": ["今天天气很好,我们去散步吧。", "我最喜欢的菜谱需要三个鸡蛋和面粉。", "去城里的火车九点出发。",
           "猫一天中大部分时间都在睡觉。", "这本小说的结局出人意料。"],
}


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


# -- the chip stream and per-chip randomness -------------------------------------------------------
def spec_stream(seed: int) -> Iterator[ChipSpec]:
    """Distinct chips, uniformly drawn; the same sequence as `sample_specs(n, seed)` for any n."""
    rng = random.Random(seed)
    seen: set[ChipSpec] = set()
    universe = (DIM_MAX - DIM_MIN + 1) ** 3
    while len(seen) < universe:
        spec = ChipSpec(rng.randint(DIM_MIN, DIM_MAX), rng.randint(DIM_MIN, DIM_MAX), rng.randint(DIM_MIN, DIM_MAX))
        if spec not in seen:
            seen.add(spec)
            yield spec


def chip_rng(seed: int, spec: ChipSpec) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
    return random.Random(f"{seed}:{spec.key()}")


# -- rejected answers ------------------------------------------------------------------------------
def _corrupt(reason: str, rng: random.Random) -> str:
    """Drop or repeat words (characters for Chinese), never returning the reason unchanged."""
    words = reason.split() if " " in reason.strip() else list(reason)
    if len(words) < 2:
        return (reason + " " + reason).strip()
    for _ in range(10):
        out = list(words)
        for _ in range(rng.randint(1, max(1, len(words) // 4))):
            i = rng.randrange(len(out))
            if rng.random() < 0.5 and len(out) > 1:
                del out[i]
            else:
                out.insert(i, out[i])
        text = (" " if " " in reason.strip() else "").join(out)
        if text != reason:
            return text
    return reason + " " + words[-1]


def _malformed(action: str, reason: str, rng: random.Random) -> str:
    good = format_advice(action, reason)
    kind = rng.choice(("truncate", "unbalanced", "single_quotes", "unquoted_key"))
    if kind == "truncate":
        text = good[: rng.randint(1, len(good) - 2)]
    elif kind == "unbalanced":
        text = good[:-1]
    elif kind == "single_quotes":
        text = good.replace('"', "'")
    else:
        text = good.replace('"action"', "action", 1)
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return text
    return good[:-1]  # always broken, whatever the reason text held


def make_rejected(strategy: str, action: str, reason: str, language: str, rng: random.Random) -> str:
    others = [a for a in ACTIONS if a != action]
    if strategy == "wrong_action":
        other = rng.choice(others)
        return format_advice(other, rule_reason(other, language))
    if strategy == "mismatched_reason":
        return format_advice(action, rule_reason(rng.choice(others), language))
    if strategy == "corrupted_reason":
        return format_advice(action, _corrupt(reason, rng))
    if strategy == "malformed_json":
        return _malformed(action, reason, rng)
    if strategy == "missing_action":
        return json.dumps({"reason": reason}, ensure_ascii=False)
    if strategy == "off_topic":
        return rng.choice(OFF_TOPIC[language])
    raise ValueError(f"unknown strategy {strategy!r}")


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    names = [s for s in STRATEGIES if weights.get(s, 0) > 0]
    return rng.choices(names, weights=[weights[s] for s in names])[0]


def _choose_split(u: float, need: dict[str, int]) -> str:
    """Splits fill in proportion to what each still needs, so all of them finish together."""
    total = sum(need.values())
    acc = 0.0
    for split in SPLITS:
        acc += need[split] / total
        if u < acc and need[split] > 0:
            return split
    return next(s for s in reversed(SPLITS) if need[s] > 0)


def build_row(split: str, spec: ChipSpec, advice: Advice, rng: random.Random, cfg: PreferenceConfig,
              teacher_model: str) -> dict[str, Any]:
    prompt = [{"role": "user", "content": dims_prompt(spec, cfg.language)}]
    dims = {"length": spec.length, "width": spec.width, "height": spec.height}
    if split == "sft":
        keep = rng.random() >= cfg.sft_label_noise
        sft_action = advice.action if keep else rng.choice(ACTIONS)
        # A kept action keeps the teacher's own reason; another action gets its plausible reason.
        reason = advice.reason if sft_action == advice.action else rule_reason(sft_action, cfg.language)
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": format_advice(sft_action, reason)}],
                **dims, "teacher_action": advice.action, "sft_action": sft_action}
    strategy = _weighted(rng, cfg.rejection_weights)
    chosen = format_advice(advice.action, advice.reason)
    rejected = make_rejected(strategy, advice.action, advice.reason, cfg.language, rng)
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **dims,
            "teacher_action": advice.action, "teacher_model": teacher_model, "rejection_strategy": strategy}


# -- the output folder -----------------------------------------------------------------------------
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


# -- the stage -------------------------------------------------------------------------------------
def run(cfg: PreferenceConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    args = semantic_args(cfg)
    # A run that starts the folder asks its teacher first (the Ollama teacher checks its hosts), so a
    # refused host leaves no folder or args.json behind; a resumed run asks it only if rows are missing.
    teacher = _make_teacher(cfg, out) if check_dir(out, args, cfg.overwrite) else None
    try:
        prepare_dir(out, args, cfg.overwrite)
        n_test = round(cfg.n * cfg.test_fraction)
        quota = {"train": cfg.n - n_test, "test": n_test, "sft": args["sft_n"]}

        # What a previous run (killed or finished) left: rows per split and skipped chips.
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
        resumed = sum(counts.values())

        need = {s: quota[s] - counts[s] for s in SPLITS}
        in_a_row = 0  # chips skipped in a row: a teacher that never conforms must not walk all 10^6 chips
        stream = spec_stream(cfg.seed)
        writer = AppendWriter({**{s: out / f"{s}.jsonl" for s in SPLITS}, "skipped": out / "skipped.jsonl"})
        try:
            while sum(need.values()) > 0:
                # Exactly as many chips as rows still missing: every chip asked is then consumed in order
                # (written or skipped), which keeps the failure counts exact and the order resumable.
                batch: list[ChipSpec] = []
                want = min(cfg.batch_size, sum(need.values()))
                for spec in stream:
                    if spec not in done and spec not in skipped:
                        batch.append(spec)
                        if len(batch) == want:
                            break
                if not batch:
                    raise UserError("ran out of distinct chips before the splits were full; ask for fewer rows")
                if teacher is None:
                    teacher = _make_teacher(cfg, out)
                answers = teacher.advise_many(batch, cfg.language)
                stop: str | None = None
                for spec, answer in zip(batch, answers):
                    if answer.advice is None:
                        reason = answer.failure or "unknown"
                        if reason not in CONTENT_FAULTS:  # the host, not the answer: skipping would lose the chip
                            fix = FATAL.get(reason, "check the host").format(
                                model=cfg.ollama_model, timeout=cfg.timeout,
                                attempts=f"{cfg.retries + 1} attempt{'s' if cfg.retries else ''}")
                            pool = getattr(teacher, "pool", None)
                            if reason == "unreachable" and pool is not None and pool.all_down():
                                fix = pool.down_text()  # names every host and why, not just "start it"
                            stop = f"the Ollama teacher failed on chip {spec.key()} ({reason}: {fix})"
                            break
                        writer.write("skipped", {"length": spec.length, "width": spec.width, "height": spec.height,
                                                 "reason": reason})
                        skipped.add(spec)
                        in_a_row += 1
                        if in_a_row >= MAX_SKIPS_IN_A_ROW:
                            stop = (f"the teacher gave no conforming answer for {in_a_row} chips in a row (last: "
                                    f"{reason}); check that --ollama_model {cfg.ollama_model} follows the JSON schema")
                            break
                        continue
                    in_a_row = 0
                    rng = chip_rng(cfg.seed, spec)
                    split = _choose_split(rng.random(), need)
                    writer.write(split, build_row(split, spec, answer.advice, rng, cfg, teacher.model_name))
                    done[spec] = split
                    need[split] -= 1
                writer.flush()
                if stop:
                    kept = sum(quota.values()) - sum(need.values())
                    raise UserError(f"{stop}; the {kept} rows written are kept: rerun the same command to resume")
        finally:
            writer.close()
    finally:
        if teacher is not None:
            teacher.close()

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


def build_manifest(cfg: PreferenceConfig, out: Path, args: dict[str, Any], quota: dict[str, int]) -> dict[str, Any]:
    """Counts read back from the files, so they are exact however many times the run was resumed."""
    splits: dict[str, int] = {}
    actions: dict[str, dict[str, int]] = {}
    strategies: Counter[str] = Counter()
    sft_agree = 0
    for split in SPLITS:
        rows = recover_jsonl(out / f"{split}.jsonl")
        splits[split] = len(rows)
        actions[split] = dict(sorted(Counter(r["teacher_action"] for r in rows).items()))
        if split == "sft":
            sft_agree = sum(r["sft_action"] == r["teacher_action"] for r in rows)
        else:
            strategies.update(r["rejection_strategy"] for r in rows)
    failures = Counter(r.get("reason", "unknown") for r in recover_jsonl(out / "skipped.jsonl"))
    log = read_request_log(out / "requests.jsonl")
    attempt_failures: Counter[str] = Counter(log["attempt_failures"])
    per_host: Counter[str] = Counter(log["per_host"])
    requests, cache_hits = log["requests"], log["cache_hits"]
    for entry in recover_jsonl(out / "teacher_log.jsonl"):
        attempt_failures.update(entry.get("attempt_failures", {}))
        per_host.update(entry.get("per_host", {}))
        requests += entry.get("requests", 0)
        cache_hits += entry.get("cache_hits", 0)
    return {
        "stage": "data preference", "variant": cfg.variant, "teacher": cfg.teacher,
        "teacher_model": "rule" if cfg.teacher == "rule" else cfg.ollama_model,
        "seed": cfg.seed, "language": cfg.language, "n": cfg.n, "quota": quota, "splits": splits,
        "complete": all(splits[s] == quota[s] for s in SPLITS),
        "actions": actions, "rejection_strategies": dict(sorted(strategies.items())),
        "sft_label_noise": cfg.sft_label_noise,
        "sft_agreement": round(sft_agree / splits["sft"], 4) if splits["sft"] else None,
        "failures": dict(sorted(failures.items())),  # chips skipped, by the reason of their last attempt
        "attempt_failures": dict(sorted(attempt_failures.items())),  # every failed request, retried or not
        "requests": requests, "cache_hits": cache_hits,
        "requests_per_host": dict(sorted(per_host.items())),
        "args": args, "files": {s: f"{s}.jsonl" for s in SPLITS},
    }

