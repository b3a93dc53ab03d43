"""The advice schema, how answers are written, and a robust parser for what models return."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

ACTIONS: tuple[str, ...] = ("increase", "decrease", "no_change")

# JSON schema sent as Ollama's `format` (structured outputs) and used to validate answers. The
# reason's maxLength becomes part of the grammar the server samples under, so the string always
# closes: without it a small model that loops in its reason (SmolLM2-135M did, on some llama.cpp
# builds) runs out of tokens mid-string and the answer is broken JSON.
REASON_MAX_CHARS = 240
ADVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": list(ACTIONS)},
        "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
    },
    "required": ["action", "reason"],
}

_SYNONYMS = {
    "increase": "increase", "increased": "increase", "up": "increase", "enlarge": "increase", "增大": "increase",
    "decrease": "decrease", "decreased": "decrease", "down": "decrease", "reduce": "decrease", "减小": "decrease",
    "no_change": "no_change", "no change": "no_change", "nochange": "no_change", "no-change": "no_change",
    "none": "no_change", "keep": "no_change", "unchanged": "no_change", "不动": "no_change", "不变": "no_change",
}


class AdviceParseError(ValueError):
    """An answer that does not conform to the advice schema; `reason` is a short machine tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Advice:
    action: str
    reason: str

    def to_json(self) -> str:
        return format_advice(self.action, self.reason)


def format_advice(action: str, reason: str) -> str:
    """The one canonical way an answer is written (what `chosen` responses look like)."""
    return json.dumps({"action": action, "reason": reason}, ensure_ascii=False)


_ACTION_OPEN = re.compile(r'"action"\s*:\s*"')


def action_token_index(pieces: list[str]) -> int | None:
    """Index of the token where an answer's action word begins, given its tokens' texts: the one
    token that decides the advice (everything before it is format). None when there is none."""
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        opened = _ACTION_OPEN.search(text)
        if opened and len(text) > opened.end():
            return i
    return None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


def extract_json_object(text: str) -> dict | None:
    """The JSON object in a model's reply: the whole text, a ```json fence, or the first {...}."""
    raw = text.strip()
    try:
        obj = json.loads(raw)
        if isinstance(obj, dict):
            return obj
    except json.JSONDecodeError:
        pass
    fenced = _FENCE.search(raw)
    if fenced:
        raw = fenced.group(1)
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", raw):
        try:
            obj, _ = decoder.raw_decode(raw, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def parse_advice(text: str, *, strict: bool = False) -> Advice:
    """Parse a model's answer into Advice.

    strict=True accepts only one JSON object with a valid `action` (the evaluation's notion of
    "valid JSON"). strict=False is what the data teacher uses on real models: it also accepts
    code fences, text around the object, action synonyms and case differences."""
    if not isinstance(text, str):
        raise AdviceParseError("not_text", repr(text)[:80])
    raw = text.strip()
    if strict:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            raise AdviceParseError("not_json", raw[:80]) from None
        if not isinstance(obj, dict):
            raise AdviceParseError("not_object", raw[:80])
    else:
        obj = extract_json_object(raw)
        if obj is None:
            raise AdviceParseError("not_json", raw[:80])
    action = obj.get("action")
    if not isinstance(action, str):
        raise AdviceParseError("missing_action", raw[:80])
    key = action.strip().lower()
    norm = action if strict else _SYNONYMS.get(key, _SYNONYMS.get(key.replace("_", " ")))
    if norm not in ACTIONS:
        raise AdviceParseError("bad_action", str(action)[:40])
    reason = obj.get("reason", "")
    if not isinstance(reason, str):
        if strict:
            raise AdviceParseError("bad_reason", repr(reason)[:40])
        reason = str(reason)
    return Advice(norm, reason.strip())
