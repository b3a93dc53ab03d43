"""The chip domain: specs, sampling, prompts (zh/en), the advice schema and its parser, the rule
teacher and the judge of an answer against it.

Two task variants come from the seed document:
- `dims`: a chip [length, width, height] in mm (1..100) and advice
  {"action": "increase" | "decrease" | "no_change", "reason": "..."} (the LLM track);
- `env`: width_nm, length_nm, power_mw, performance_score and an action 0..3 (the Gym track,
  see `rlhf.chips.physics`).
"""

from rlhf.chips.advice import (
    ACTIONS,
    ADVICE_SCHEMA,
    Advice,
    AdviceParseError,
    action_token_index,
    format_advice,
    parse_advice,
)
from rlhf.chips.prompts import LANGUAGES, dims_prompt, prompt_language, spec_from_prompt
from rlhf.chips.rule import RULES, judge, rule_action, rule_advice, rule_reason
from rlhf.chips.spec import DIM_MAX, DIM_MIN, ChipSpec, sample_specs

__all__ = [
    "ACTIONS", "ADVICE_SCHEMA", "Advice", "AdviceParseError", "action_token_index", "format_advice", "parse_advice",
    "LANGUAGES", "dims_prompt", "prompt_language", "spec_from_prompt", "RULES", "judge", "rule_action", "rule_advice",
    "rule_reason",
    "DIM_MAX", "DIM_MIN", "ChipSpec", "sample_specs",
]
