"""PPO's metrics: the per-update row of metrics.jsonl, metrics.json at the end, the curves, and the
signals read off the rows while PPO runs (today, the collapse onto one answer)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlhf.chips import ACTIONS
from rlhf.io import read_jsonl
from rlhf.ppo import core

if TYPE_CHECKING:  # for the annotation only: the report imports CURVES without the sampler and models
    from rlhf.ppo.rollout import Rollout

# The per-update curves of ppo_curves.png and the report: learning (score, batch agreement), the
# leash (KL), collapse (entropy at the action token, each action's share), the critic, and the
# largest single-token move of an update (what early_stop_log_ratio bounds).
CURVES = ["score_mean", "agreement_batch", "kl", "entropy_decision",
          *(f"action_share_{a}" for a in ACTIONS), "vf_loss", "clipfrac", "max_log_ratio", "response_length"]


class CollapseWatch:
    """Flags the failure PPO on this task falls into: one action takes over the batch while the
    agreement with the rule teacher does not rise (the policy found what the reward model likes on
    average, not what is right per chip). `agreement_batch` is compared with its mean over the
    first `window` updates; a rise of less than `min_rise` counts as not rising. A batch whose chips
    mostly call for that action (the teacher's share above `share` too) is not a collapse: with 4
    chips per batch, 4 alike is common."""

    def __init__(self, share: float = 0.9, window: int = 4, min_rise: float = 0.1) -> None:
        self.share, self.window, self.min_rise = share, window, min_rise
        self._start: list[float] = []
        self.first: dict[str, Any] | None = None  # the first update that tripped it

    def check(self, row: dict[str, Any]) -> str | None:
        """A one-line warning the first time `row` shows a collapse, else None."""
        if len(self._start) < self.window:
            self._start.append(row["agreement_batch"])
        start = sum(self._start) / len(self._start)
        action = max(ACTIONS, key=lambda a: row[f"action_share_{a}"])
        share = row[f"action_share_{action}"]
        teacher = row.get(f"teacher_share_{action}", 0.0)
        called_for = teacher > self.share
        collapsed = share > self.share and not called_for and row["agreement_batch"] - start < self.min_rise
        row["collapse"] = int(collapsed)
        if not collapsed or self.first is not None:
            return None
        self.first = {"update": row["update"], "action": action, "share": round(share, 3),
                      "agreement_batch": round(row["agreement_batch"], 3), "agreement_start": round(start, 3)}
        return (f"warning: update {row['update']}: {share:.0%} of the batch answers {action!r} (the teacher: "
                f"{teacher:.0%}) while agreement with the rule stays at {row['agreement_batch']:.2f} (start "
                f"{start:.2f}): PPO is collapsing onto one answer; see README, 'Reward hacking signs'")


def rollout_stats(b: Rollout, stats: dict[str, float]) -> dict[str, float]:
    """This process's numbers of one update: what its rollout shows, then the update's `stats`
    (losses, clip fractions, gradient norms). The trainer averages them over processes."""
    mask = b.mask
    return {
        "score_mean": float(b.scores.mean()),
        "score_std": float(b.scores.std()) if len(b.scores) > 1 else 0.0,
        "kl": float(b.kl.mean()), "entropy": float(b.entropy),
        "response_length": float(mask.sum(1).float().mean()),
        "no_stop_fraction": float((~b.has_stop).float().mean()),
        "explained_variance": core.explained_variance(b.values, b.returns, mask),
        "entropy_decision": b.entropy_decision,
        "agreement_batch": float(np.mean(b.agree)),
        **{f"action_share_{a}": float(np.mean([x == a for x in b.actions])) for a in ACTIONS},
        **{f"teacher_share_{a}": float(np.mean([x == a for x in b.teacher_actions])) for a in ACTIONS},
        **stats,
    }


def check_row(row: dict[str, Any]) -> None:
    """Stops the run on a non-finite score or KL; a batch where no answer reached an action logs
    its decision entropy as None (JSON has no nan)."""
    for k in ("score_mean", "kl"):
        if not math.isfinite(row[k]):
            raise FloatingPointError(f"non-finite {k} at update {row['update']}")
    if not math.isfinite(row["entropy_decision"]):
        row["entropy_decision"] = None


def final_metrics(rows: list[dict[str, Any]], last: dict[str, Any], before: dict[str, Any],
                  after: dict[str, Any], run: dict[str, Any],
                  collapse_warning: dict[str, Any] | None) -> dict[str, Any]:
    """metrics.json: agreement, validity and reward before and after (the evaluations' dicts), the
    KL and score of the last logged row (`last`, this run's last row, when none was logged), the
    run's own numbers (`run`: updates, speed, time split, ...), each action's share after, the
    collapse warning and the Ollama judge's failures over the logged rows."""
    final = (rows or [last])[-1]
    m: dict[str, Any] = {
        "agreement_before": before.get("agreement_greedy"), "agreement_after": after.get("agreement_greedy"),
        "agreement_sampled_before": before.get("agreement_sampled"),
        "agreement_sampled_after": after.get("agreement_sampled"),
        "json_valid_before": before.get("json_valid_greedy"), "json_valid_after": after.get("json_valid_greedy"),
        "reward_before": before.get("reward_mean"), "reward_after": after.get("reward_mean"),
        "kl_final": final.get("kl"), "score_final": final.get("score_mean"),
        **run,
        "samples_before": before.get("samples", []), "samples_after": after.get("samples", []),
        "action_share_after": after.get("action_share_greedy"),
        "action_share_sampled_after": after.get("action_share_sampled"),
        "collapse_warning": collapse_warning,
    }
    judged = [r for r in rows if "reward_ollama_calls" in r]
    if judged:  # the Ollama judge's failures (each scored a neutral 0.5), over the logged updates
        m["judge_failures"] = sum(r["reward_ollama_failures"] for r in judged)
        m["judge_calls"] = sum(r["reward_ollama_calls"] for r in judged)
    return m


def logged_rows(out: Path) -> list[dict[str, Any]]:
    """The per-update rows of metrics.jsonl in `out` (a torn last line from a kill is dropped)."""
    log = out / "metrics.jsonl"
    return read_jsonl(log, tolerate_torn_tail=True) if log.exists() else []


def plot_ppo_curves(out: Path) -> None:
    """ppo_curves.png from metrics.jsonl in `out`."""
    from rlhf.plots import plot_curves

    rows = logged_rows(out)
    if rows:
        plot_curves(rows, CURVES, out / "ppo_curves.png", title="PPO")
