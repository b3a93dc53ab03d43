"""The rule teacher: the one source of truth for "correct advice" (data labels, evaluation
agreement and the rule reward all call it), and `judge`, which grades one answer against it.

Default rule `height` (physically motivated, learnable from digits by a tiny model):
  the height is the package's vertical heat path. Below 34 mm the stack is too thin to spread the
  heat the die dissipates, so increase it; at 67 mm and above it is too tall (long thermal path,
  mechanical stress), so decrease it; in between it is balanced: no change.
  Over heights uniform in 1..100 the classes are 33 / 33 / 34 %.
"""

from __future__ import annotations

from rlhf.chips.advice import Advice, AdviceParseError, parse_advice
from rlhf.chips.prompts import spec_from_prompt
from rlhf.chips.spec import ChipSpec

RULES = ("height",)

HEIGHT_LOW, HEIGHT_HIGH = 33, 67  # <= LOW: increase; >= HIGH: decrease

REASONS = {
    "en": {
        "increase": "Too thin to spread heat; a taller package cools better.",
        "decrease": "Too tall; a shorter package shortens the heat path.",
        "no_change": "Height is balanced for heat and stress; keep it.",
    },
    "zh": {
        "increase": "芯片太薄,散热不足;增加高度可降低热阻。",
        "decrease": "芯片太高,热路径过长且应力大;应减小高度。",
        "no_change": "高度处于散热与应力的平衡区间,保持不变。",
    },
}


def rule_action(spec: ChipSpec, rule: str = "height") -> str:
    if rule != "height":
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if spec.height <= HEIGHT_LOW:
        return "increase"
    if spec.height >= HEIGHT_HIGH:
        return "decrease"
    return "no_change"


def rule_reason(action: str, language: str = "en") -> str:
    return REASONS[language][action]


def rule_advice(spec: ChipSpec, language: str = "en", rule: str = "height") -> Advice:
    action = rule_action(spec, rule)
    return Advice(action, rule_reason(action, language))


def judge(prompt_text: str, response: str, has_stop: bool = True) -> tuple[bool, bool, str | None]:
    """(valid JSON advice, agrees with the rule teacher, parsed action) for one answer."""
    spec = spec_from_prompt(prompt_text)
    try:
        action = parse_advice(response, strict=True).action if has_stop else None
    except AdviceParseError:
        action = None
    valid = action is not None
    agree = valid and spec is not None and action == rule_action(spec)
    return valid, agree, action
