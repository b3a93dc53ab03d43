"""The reward model on the task's canonical answers: per-action offsets, and per-chip baselines.

A reward model can rank the right action first on nearly every chip and still rate one action's
answers higher on average over all chips. A policy that does not yet read the chip then gains by
giving that answer everywhere, and once the other answers are never sampled nothing brings them
back. The probe scores the canonical answer of each action (`format_advice` with the rule's reason,
in the prompt's language) on the first chips of the training prompts; `core.action_offsets` turns
that into each action's lead, which `Collector.learning_scores` subtracts from the answers with that
action (it knows each answer's action already).

`CanonicalBaselines` scores the same canonical answers for each prompt of a batch the first time it
comes: their mean is what the reward model gives that chip whatever the answer, which
`score_baseline canonical` takes out of the chip's answers (see `PPOConfig.score_baseline`).
"""

from __future__ import annotations

import torch

from rlhf.chips import ACTIONS, format_advice, prompt_language, rule_reason, spec_from_prompt
from rlhf.errors import UserError
from rlhf.ppo import core
from rlhf.ppo.rollout import Prompt, ScoreFn


def chip_prompts(prompts: list[Prompt]) -> list[Prompt]:
    """The prompts that name a chip [length, width, height]."""
    return [p for p in prompts if spec_from_prompt(p[-1]["content"]) is not None]


def canonical_scores(score: ScoreFn, prompts: list[Prompt]) -> torch.Tensor:
    """[len(prompts), len(ACTIONS)]: the score of each action's canonical answer (`format_advice`
    with the rule's reason, in the prompt's language) to each prompt."""
    rows, answers = [], []
    for prompt in prompts:
        language = prompt_language(prompt[-1]["content"])
        for action in ACTIONS:
            rows.append(prompt)
            answers.append(format_advice(action, rule_reason(action, language)))
    with torch.no_grad():
        scores = score(rows, answers, torch.ones(len(rows), dtype=torch.bool)).float()
    return scores.view(len(prompts), len(ACTIONS))


def probe_action_offsets(score: ScoreFn, prompts: list[Prompt], n_chips: int) -> dict[str, float]:
    """Each action's offset (see the module doc) over the first `n_chips` chip prompts."""
    chips = chip_prompts(prompts)[:n_chips]
    if not chips:
        raise UserError("action_offset_chips: no prompt of the training data names a chip [length, width, "
                        "height] to probe; set --action_offset_chips 0 for other tasks")
    offsets = core.action_offsets(canonical_scores(score, chips).cpu())
    return {action: float(o) for action, o in zip(ACTIONS, offsets)}


class CanonicalBaselines:
    """[len(prompts)] for a batch: the mean score of the canonical answers to each prompt (all chip
    prompts), each prompt scored once per run. The scorers are frozen, and every training prompt
    comes back about total_episodes / len(prompts) times (9 in the demo), so scoring each batch
    anew would cost three answers' scoring per episode for the same numbers."""

    def __init__(self, score: ScoreFn) -> None:
        self.score = score
        self.known: dict[tuple[tuple[str, str], ...], float] = {}

    def __call__(self, prompts: list[Prompt]) -> torch.Tensor:
        keys = [_key(p) for p in prompts]
        new = list({k: p for k, p in zip(keys, prompts) if k not in self.known}.items())
        if new:
            means = canonical_scores(self.score, [p for _, p in new]).mean(1)
            self.known.update(zip([k for k, _ in new], means.tolist()))
        return torch.tensor([self.known[k] for k in keys])

    def state(self) -> list[tuple[tuple[tuple[str, str], ...], float]]:
        """What a checkpoint keeps: rescored after a resume in other batches, a prompt's baseline
        could differ in float rounding, and the run would no longer end as an uninterrupted one."""
        return list(self.known.items())

    def load(self, state: list[tuple[tuple[tuple[str, str], ...], float]]) -> None:
        self.known = {tuple(tuple(m) for m in key): float(v) for key, v in state}


def _key(prompt: Prompt) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in prompt)


def check_canonical_prompts(prompts: list[Prompt]) -> None:
    """score_baseline canonical needs a chip in every training prompt: refuse before training."""
    chips = len(chip_prompts(prompts))
    if chips < len(prompts):
        raise UserError(f"score_baseline canonical: {len(prompts) - chips} of {len(prompts)} training prompts "
                        "name no chip [length, width, height] to score canonical answers for; use "
                        "--score_baseline none (or group) for other tasks")
