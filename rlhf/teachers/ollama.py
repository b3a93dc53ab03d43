"""The Ollama teacher: chip advice from a model served by Ollama, asked through `rlhf.ollama.pool`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.ollama.names import DEFAULT_MODEL
from rlhf.ollama.pool import OllamaPool


class OllamaTeacher:
    """Chip advice from a model served by Ollama (structured output = ADVICE_SCHEMA)."""

    def __init__(self, model: str = DEFAULT_MODEL, hosts: str | list[str] | None = None, concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, cache_dir: str | Path | None = None,
                 options: dict | None = None, check: bool = True, progress: bool = False,
                 request_log: str | Path | None = None) -> None:
        self.model_name = model
        self.progress = progress
        self.pool = OllamaPool(model, hosts, concurrency, timeout, retries, backoff, cache_dir, options,
                               request_log)
        if check:
            try:
                self.pool.check()
            except UserError:
                self.pool.close()
                raise

    @staticmethod
    def _validate(obj: dict) -> Any:
        from rlhf.chips import ACTIONS

        if obj.get("action") not in ACTIONS:
            raise ValueError(f"action {obj.get('action')!r} not in {ACTIONS}")
        if not isinstance(obj.get("reason"), str) or not obj["reason"].strip():
            raise ValueError("reason must be a non-empty string")
        return obj

    def advise_many(self, specs: list[Any], language: str = "en") -> list[Any]:
        from rlhf.chips import ADVICE_SCHEMA, Advice, dims_prompt
        from rlhf.teachers.base import TeacherAnswer

        prompts = [dims_prompt(s, language) for s in specs]
        results = self.pool.chat_json_many(prompts, ADVICE_SCHEMA, validate=self._validate, progress=self.progress)
        return [TeacherAnswer(Advice(r.data["action"], r.data["reason"].strip())) if r.ok and r.data
                else TeacherAnswer(None, r.error or "unknown") for r in results]

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()

    def close(self) -> None:
        self.pool.close()
