"""Judges of the chip environment: a score in [0, 1] for taking `action` in state `observation`.

- `none`:   no judge; the judge term of the reward is 0.
- `model`:  the chip model's own score of the action (1 = best next state, 0 = worst), offline.
- `ollama`: an LLM served by Ollama, asked through the project's one client
            (`rlhf.ollama.pool.OllamaPool`: retries, hosts, disk cache). In front of it sits an
            in-memory cache keyed by (rounded observation, action); `prefetch` asks for all four
            actions of many states in one batch. A failed answer counts as a neutral 0.5 and is
            counted in `stats()`; past the threshold of `rlhf.ollama.guard.JudgeFailureGuard`
            the run stops with one line. Built with `from_options`, it first checks that the host
            answers and serves the model. The judge is called by the environment's reward, never
            inside the policy's forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from rlhf.chips import physics
from rlhf.ollama.names import DEFAULT_MODEL

NEUTRAL = 0.5
JUDGES = ("none", "model", "ollama")


class Judge(Protocol):
    name: str

    def score(self, observation: Sequence[float], action: int) -> float: ...

    def prefetch(self, observations: Iterable[Sequence[float]]) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class NoJudge:
    name = "none"

    def score(self, observation: Sequence[float], action: int) -> float:
        return 0.0

    def prefetch(self, observations: Iterable[Sequence[float]]) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"judge": self.name}


class ModelJudge:
    """The chip model's normalised merit of the next state: needs no network, exact, fast."""

    name = "model"

    def score(self, observation: Sequence[float], action: int) -> float:
        return physics.action_score(float(observation[0]), float(observation[1]), int(action))

    def prefetch(self, observations: Iterable[Sequence[float]]) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"judge": self.name}


def state_key(observation: Sequence[float]) -> tuple[float, ...]:
    """Observations rounded to 0.1: the judge's prompt shows one decimal, so equal keys mean equal prompts."""
    return tuple(round(float(x), 1) for x in observation[:4])


def _check_score(data: dict) -> None:
    s = data.get("score")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0:
        raise ValueError(f"score must be a number in [0, 1], got {s!r}")


class OllamaJudge:
    """An LLM judge with an in-memory cache in front of the (disk-cached, retrying) OllamaPool."""

    name = "ollama"

    def __init__(self, pool: Any, language: str = "en") -> None:
        from rlhf.ollama.guard import JudgeFailureGuard

        self.pool = pool
        self.guard = JudgeFailureGuard(pool, "fix it and rerun, or use --judge model (offline)")
        self.language = language
        self.cache: dict[tuple[tuple[float, ...], int], float] = {}
        self.hits = 0
        self.queries = 0
        self.failures = 0

    @classmethod
    def from_options(cls, model: str, hosts: str | None, language: str = "en", cache_dir: str | None = None,
                     concurrency: int = 4, timeout: float = 60.0, retries: int = 2) -> OllamaJudge:
        from rlhf.ollama.pool import OllamaPool

        pool = OllamaPool(model=model, hosts=hosts, concurrency=concurrency, timeout=timeout, retries=retries,
                          cache_dir=cache_dir)
        pool.check()  # a host that is down or lacks the model fails here, in one line, not as 0.5s
        return cls(pool, language)

    def prefetch(self, observations: Iterable[Sequence[float]]) -> None:
        """Score every action of every state not cached yet, in one batch of requests."""
        todo: list[tuple[tuple[float, ...], int]] = []
        seen = set(self.cache)
        for obs in observations:
            key = state_key(obs)
            for a in range(physics.N_ACTIONS):
                if (key, a) not in seen:
                    seen.add((key, a))
                    todo.append((key, a))
        if not todo:
            return
        prompts = [physics.judge_prompt(key, a, self.language) for key, a in todo]
        results = self.pool.chat_json_many(prompts, physics.JUDGE_SCHEMA, validate=_check_score)
        self.queries += len(todo)
        for (key, a), res in zip(todo, results):
            if res.ok and res.data is not None:
                self.cache[(key, a)] = float(res.data["score"])
            else:
                self.failures += 1
                self.cache[(key, a)] = NEUTRAL
        self.guard.record(results)

    def score(self, observation: Sequence[float], action: int) -> float:
        key = (state_key(observation), int(action))
        if key in self.cache:
            self.hits += 1
        else:
            self.prefetch([observation])  # a miss fetches the state's four actions together
        return self.cache[key]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"judge": self.name, "queries": self.queries, "cache_hits": self.hits,
                               "failures_neutral": self.failures, "cached": len(self.cache)}
        pool_stats = getattr(self.pool, "stats", None)
        if callable(pool_stats):
            out["ollama"] = pool_stats()
        return out


def make_judge(name: str, *, ollama_model: str = DEFAULT_MODEL, ollama_host: str | None = None,
               language: str = "en", cache_dir: str | None = None) -> Judge:
    if name == "none":
        return NoJudge()
    if name == "model":
        return ModelJudge()
    if name == "ollama":
        return OllamaJudge.from_options(ollama_model, ollama_host, language=language, cache_dir=cache_dir)
    raise ValueError(f"judge must be one of {', '.join(JUDGES)}, got {name!r}")
