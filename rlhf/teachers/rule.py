"""The rule teacher: `rlhf.chips.rule` (the single source of truth) behind the Teacher interface."""

from __future__ import annotations

from typing import Any

from rlhf.chips import ChipSpec, rule_advice
from rlhf.teachers.base import TeacherAnswer


class RuleTeacher:
    """Deterministic, instant, never fails: the embedded default teacher."""

    model_name = "rule"

    def __init__(self, rule: str = "height") -> None:
        self.rule = rule

    def advise_many(self, specs: list[ChipSpec], language: str = "en") -> list[TeacherAnswer]:
        return [TeacherAnswer(rule_advice(s, language, self.rule)) for s in specs]

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass
