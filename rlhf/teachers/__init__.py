"""Teachers label chips with advice: `rule` (embedded, deterministic) or `ollama` (any served model).

    teacher = make_teacher("ollama", model="qwen2.5:7b", hosts="http://h1:11434,http://h2:11434")
    answers = teacher.advise_many(specs, "en")   # [TeacherAnswer(advice | None, failure | None)]
"""

from __future__ import annotations

from typing import Any

from rlhf.errors import UserError
from rlhf.teachers.base import Teacher, TeacherAnswer

TEACHERS = ("rule", "ollama")


def make_teacher(name: str, **kw: Any) -> Teacher:
    """`rule` takes `rule=`; `ollama` takes OllamaTeacher's keywords (model, hosts, concurrency, ...)."""
    if name == "rule":
        from rlhf.teachers.rule import RuleTeacher

        return RuleTeacher(**kw)
    if name == "ollama":
        from rlhf.teachers.ollama import OllamaTeacher

        return OllamaTeacher(**kw)
    raise UserError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")


__all__ = ["TEACHERS", "Teacher", "TeacherAnswer", "make_teacher"]
