"""What every teacher returns, and the interface the data stage relies on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from rlhf.chips import Advice, ChipSpec


@dataclass(frozen=True)
class TeacherAnswer:
    advice: Advice | None  # None when the teacher never gave a conforming answer
    failure: str | None = None  # the reason tag then ("not_json", "schema", "timeout", ...)


class Teacher(Protocol):
    model_name: str

    def advise_many(self, specs: list[ChipSpec], language: str = "en") -> list[TeacherAnswer]: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
