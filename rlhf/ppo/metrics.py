"""Signals read off the per-update metrics while PPO runs: today, the collapse onto one answer."""

from __future__ import annotations

from typing import Any

from rlhf.chips import ACTIONS

# The per-update curves of ppo_curves.png and the report: learning (score, batch agreement), the
# leash (KL), collapse (entropy at the action token, each action's share) and the critic.
CURVES = ["score_mean", "agreement_batch", "kl", "entropy_decision",
          *(f"action_share_{a}" for a in ACTIONS), "vf_loss", "clipfrac", "response_length"]


class CollapseWatch:
    """Flags the failure PPO on this task falls into: one action takes over the batch while the
    agreement with the rule teacher does not rise (the policy found what the reward model likes on
    average, not what is right per chip). `agreement_batch` is compared with its mean over the
    first `window` updates; a rise of less than `min_rise` counts as not rising."""

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
        collapsed = share > self.share and row["agreement_batch"] - start < self.min_rise
        row["collapse"] = int(collapsed)
        if not collapsed or self.first is not None:
            return None
        self.first = {"update": row["update"], "action": action, "share": round(share, 3),
                      "agreement_batch": round(row["agreement_batch"], 3), "agreement_start": round(start, 3)}
        return (f"warning: update {row['update']}: {share:.0%} of the batch answers {action!r} while agreement "
                f"with the rule stays at {row['agreement_batch']:.2f} (start {start:.2f}): PPO is collapsing onto "
                "one answer; see README, 'Reward hacking signs'")
