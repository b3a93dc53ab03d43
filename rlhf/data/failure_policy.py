"""When the teacher of `rlhf data preference` gives no advice for a chip: skip the chip, or stop.

A non-conforming answer (one of CONTENT_FAULTS) is the chip's: it is skipped and the next chip takes
its place. Any other failure is the host's: skipping would lose the chip for good and change the
rerun's chips, so the run stops with its rows kept and a rerun resumes. So does a teacher that never
conforms, after MAX_SKIPS_IN_A_ROW chips, rather than walking all 10^6 chips.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf.chips import ChipSpec
from rlhf.ollama.failures import CONTENT_FAULTS

if TYPE_CHECKING:
    from rlhf.data.preference import PreferenceConfig

# The fix to name for each host failure (every tag but CONTENT_FAULTS).
FATAL = {"unreachable": "start it with `ollama serve` or fix --ollama_host",
         "timeout": "no answer within --timeout {timeout:g} s in {attempts}; raise --timeout or lower --concurrency",
         "connection": "the connection kept breaking; check the host",
         "model_not_found": "run `ollama pull {model}` on every host",
         "http_5xx": "the server kept answering 5xx; check its log",
         "http_429": "the server kept refusing (429); lower --concurrency",
         "http_4xx": "the server refused the request; check --ollama_model"}
MAX_SKIPS_IN_A_ROW = 50


def host_failure(reason: str, spec: ChipSpec, cfg: PreferenceConfig, teacher: Any) -> str | None:
    """Why the run stops when `reason` is the host's failure; None when the chip is to be skipped."""
    if reason in CONTENT_FAULTS:
        return None
    fix = FATAL.get(reason, "check the host").format(
        model=cfg.ollama_model, timeout=cfg.timeout,
        attempts=f"{cfg.retries + 1} attempt{'s' if cfg.retries else ''}")
    pool = getattr(teacher, "pool", None)
    if reason == "unreachable" and pool is not None and pool.all_down():
        fix = pool.down_text()  # names every host and why, not just "start it"
    return f"the Ollama teacher failed on chip {spec.key()} ({reason}: {fix})"


def too_many_skips(in_a_row: int, reason: str, cfg: PreferenceConfig) -> str | None:
    """Why the run stops after `in_a_row` skipped chips; None while under the limit."""
    if in_a_row >= MAX_SKIPS_IN_A_ROW:
        return (f"the teacher gave no conforming answer for {in_a_row} chips in a row (last: "
                f"{reason}); check that --ollama_model {cfg.ollama_model} follows the JSON schema")
    return None
