"""When an Ollama judge (the PPO reward's, the Gym environment's) stops the run: too many of its
recent judgements failed, or every host is down."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from rlhf.errors import UserError
from rlhf.ollama.failures import OllamaResult
from rlhf.ollama.pool import OllamaPool

# A judge stops when more than half of its last 100 judgements failed, once it has made 20. A failed
# judgement was already retried with backoff, so it is a lasting fault of the host or the model, not
# a blip. It scores a neutral 0.5, which only dilutes the judge's term while most answers are judged;
# past half, the term is mostly a constant and the run trains on other rewards than it was asked to,
# silently. The window lets a judge that recovers carry on and stops one that breaks mid-run within
# about 50 judgements; waiting for 20 keeps one unlucky small batch (2 failures of 4) from stopping.
JUDGE_MAX_FAILURE_RATE = 0.5
JUDGE_WINDOW = 100
JUDGE_MIN_JUDGEMENTS = 20
# What to do about the most common failure, in the judge's stop message.
FAILURE_FIXES = {
    "timeout": "no answer within {timeout:g} s even after retries: the host is overloaded or the model too slow for it",
    "http_5xx": "the server kept answering 5xx: check its log (the `ollama serve` output)",
    "http_429": "the server kept refusing with 429: it is overloaded",
    "unreachable": "start it with `ollama serve` or fix --ollama_host",
    "connection": "the connection kept breaking: check the host",
    "model_not_found": "run `ollama pull {model}` on every host",
    "http_4xx": "the server refused the request: check --ollama_model",
    "not_json": "its answers are not JSON: use a model that supports structured outputs (--ollama_model)",
    "schema": "its answers miss the score schema: use a model that supports structured outputs (--ollama_model)",
}


class JudgeFailureGuard:
    """Counts a judge's failed judgements and stops the run (UserError) when they pass the threshold
    above. `alternative` ends the message: how to run without this judge."""

    def __init__(self, pool: OllamaPool, alternative: str, max_rate: float = JUDGE_MAX_FAILURE_RATE,
                 window: int = JUDGE_WINDOW, min_judgements: int = JUDGE_MIN_JUDGEMENTS) -> None:
        self.pool = pool
        self.alternative = alternative
        self.max_rate = max_rate
        self.min_judgements = min_judgements
        self.recent: deque[str | None] = deque(maxlen=window)  # the failure tag, None when judged

    def record(self, results: Sequence[OllamaResult]) -> None:
        if self.pool.all_down():  # nothing can be judged any more: waiting for the window would only add 0.5s
            raise UserError(f"the Ollama judge (model '{self.pool.model}') stopped: {self.pool.down_text()}; "
                            f"{self.alternative}")
        for r in results:
            self.recent.append(None if r.ok and r.data is not None else (r.error or "unknown"))
        failed = Counter(tag for tag in self.recent if tag is not None)
        n_failed, n = sum(failed.values()), len(self.recent)
        if n < self.min_judgements or n_failed <= self.max_rate * n:
            return
        tag = failed.most_common(1)[0][0]
        fix = FAILURE_FIXES.get(tag, "check the host").format(timeout=self.pool.timeout, model=self.pool.model)
        tags = ", ".join(f"{k} {v}" for k, v in failed.most_common())
        raise UserError(f"the Ollama judge (model '{self.pool.model}' at {','.join(self.pool.hosts)}) failed on "
                        f"{n_failed} of its last {n} judgements ({tags}), more than {self.max_rate:.0%}: {fix}; "
                        f"{self.alternative}")
