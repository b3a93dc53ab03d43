"""The reward's per-action offsets, measured once before PPO and taken out of every score.

A reward model can rank the right action first on nearly every chip and still rate one action's
answers higher on average over all chips. A policy that does not yet read the chip then gains by
giving that answer everywhere, and once the other answers are never sampled nothing brings them
back. The probe scores the canonical answer of each action (`format_advice` with the rule's reason,
in the prompt's language) on the first chips of the training prompts; `core.action_offsets` turns
that into each action's lead, which `Collector.learning_scores` subtracts from the answers with that
action (it knows each answer's action already).
"""

from __future__ import annotations

import torch

from rlhf.chips import ACTIONS, format_advice, prompt_language, rule_reason, spec_from_prompt
from rlhf.errors import UserError
from rlhf.ppo import core
from rlhf.ppo.rollout import Prompt, ScoreFn


def probe_action_offsets(score: ScoreFn, prompts: list[Prompt], n_chips: int) -> dict[str, float]:
    """Each action's offset (see the module doc) over the first `n_chips` chip prompts."""
    chips = [p for p in prompts if spec_from_prompt(p[-1]["content"]) is not None][:n_chips]
    if not chips:
        raise UserError("action_offset_chips: no prompt of the training data names a chip [length, width, "
                        "height] to probe; set --action_offset_chips 0 for other tasks")
    rows, answers = [], []
    for prompt in chips:
        language = prompt_language(prompt[-1]["content"])
        for action in ACTIONS:
            rows.append(prompt)
            answers.append(format_advice(action, rule_reason(action, language)))
    with torch.no_grad():
        scores = score(rows, answers, torch.ones(len(rows), dtype=torch.bool)).float().cpu()
    offsets = core.action_offsets(scores.view(len(chips), len(ACTIONS)))
    return {action: float(o) for action, o in zip(ACTIONS, offsets)}

