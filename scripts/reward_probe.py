#!/usr/bin/env python
"""What a chip reward model gives PPO to learn from, read off the canonical answers.

    python scripts/reward_probe.py RUN [--chips 600]

RUN is a finished pipeline folder (its reward/ and data/train.jsonl). The reward model scores each
action's canonical answer (the answers `action_offset_chips` and `score_baseline canonical` score) on
the first --chips training chips, standardised as PPO sees them. Printed:
- each action's offset (its mean lead over the chip's mean: what `action_offset_chips` takes out);
- the spread of the chip's mean from chip to chip (what `score_baseline canonical` takes out: left
  in, the token that picks the action learns it as noise) and the spread of the per-chip gaps
  between actions (the signal);
- how often the best-scored action, offsets out, is the teacher's, and each action's gap by height.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlhf.chips import ACTIONS
from rlhf.ppo import core
from rlhf.ppo.offsets import canonical_scores, chip_prompts
from rlhf.rewards.model import ModelReward

HEIGHT_BANDS = ((0, 20), (20, 40), (40, 60), (60, 80), (80, 10**6))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="pipeline folder with reward/ and data/train.jsonl")
    ap.add_argument("--chips", type=int, default=600, help="training chips to score (3 answers each)")
    a = ap.parse_args()
    train = a.run / "data" / "train.jsonl"
    if not (a.run / "reward").is_dir() or not train.is_file():
        raise SystemExit(f"{a.run}: needs reward/ and data/train.jsonl (a finished `rlhf pipeline` folder)")
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if chip_prompts([r["prompt"]])][:a.chips]
    reward = ModelReward(str(a.run / "reward"))
    scores = canonical_scores(reward, [r["prompt"] for r in rows]).cpu()  # [chips, actions]
    offsets = core.action_offsets(scores)
    chip_mean = scores.mean(1)
    gaps = scores - offsets - chip_mean[:, None]
    teacher = torch.tensor([ACTIONS.index(r["teacher_action"]) for r in rows])
    best = gaps.argmax(1)
    print(f"{a.run}: {len(rows)} chips")
    print("offsets: " + ", ".join(f"{act} {o:+.2f}" for act, o in zip(ACTIONS, offsets.tolist())))
    print(f"chip mean, sd over chips: {chip_mean.std():.2f}; per-chip gaps, sd: {gaps.std():.2f}")
    teacher_gap = gaps[torch.arange(len(rows)), teacher].mean()
    print(f"best action (offsets out) is the teacher's on {(best == teacher).float().mean():.2f} of chips; "
          f"its mean gap {gaps.max(1).values.mean():+.2f}, the teacher's {teacher_gap:+.2f}")
    height = torch.tensor([r["height"] for r in rows])
    print("height band: chips, mean gap per action (" + ", ".join(ACTIONS) + "), teacher's actions")
    for lo, hi in HEIGHT_BANDS:
        band = (height >= lo) & (height < hi)
        if band.any():
            mean = ", ".join(f"{g:+.2f}" for g in gaps[band].mean(0).tolist())
            counts = torch.bincount(teacher[band], minlength=len(ACTIONS)).tolist()
            print(f"  [{lo}, {hi if hi < 10**6 else 'inf'}): {int(band.sum())}, {mean}, {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
