"""manifest.json of `rlhf data preference`: counts read back from the folder's files.

Read from the files rather than counted while writing, so they are exact however many times the run
was killed and resumed; request counts include those of killed runs (requests.jsonl is appended as
each request is sent).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.data.pairs import SPLITS
from rlhf.data.writer import recover_jsonl
from rlhf.ollama.pool import read_request_log

if TYPE_CHECKING:
    from rlhf.data.preference import PreferenceConfig


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
