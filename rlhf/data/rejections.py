"""The rejected answers of `rlhf data preference`: one strategy per row, drawn with its weight.

Each strategy turns the teacher's action and reason into a worse answer (see the stage's docstring
for what each one does); the reason-based ones keep a policy from gaming the reward model through
the reason text.
"""

from __future__ import annotations

import json
import random

from rlhf.chips import ACTIONS, format_advice, rule_reason

STRATEGIES = ("wrong_action", "mismatched_reason", "corrupted_reason", "malformed_json", "missing_action", "off_topic")
# Half the pairs teach the rule itself (wrong_action): format errors are easy to learn from few
# pairs, the rule is not. Measured on the tiny model, 1000 rows, 8 reward epochs: with
# 0.35/0.15/0.15/0.15/0.1/0.1 the reward model ranked the teacher's action first on 80% of held-out
# chips and PPO learned to game it (always no_change); with these weights 95% (pair accuracy 0.99).
DEFAULT_WEIGHTS = {"wrong_action": 0.5, "mismatched_reason": 0.2, "corrupted_reason": 0.1,
                   "malformed_json": 0.1, "missing_action": 0.05, "off_topic": 0.05}

OFF_TOPIC = {
    "en": ["The weather is lovely today; let's go for a walk.", "My favourite recipe uses three eggs and flour.",
           "The train to the city leaves at nine.", "Cats sleep for most of the day.",
           "This novel has a surprising ending."],
    "zh": ["今天天气很好,我们去散步吧。", "我最喜欢的菜谱需要三个鸡蛋和面粉。", "去城里的火车九点出发。",
           "猫一天中大部分时间都在睡觉。", "这本小说的结局出人意料。"],
}


def _corrupt(reason: str, rng: random.Random) -> str:
    """Drop or repeat words (characters for Chinese), never returning the reason unchanged."""
    words = reason.split() if " " in reason.strip() else list(reason)
    if len(words) < 2:
        return (reason + " " + reason).strip()
    for _ in range(10):
        out = list(words)
        for _ in range(rng.randint(1, max(1, len(words) // 4))):
            i = rng.randrange(len(out))
            if rng.random() < 0.5 and len(out) > 1:
                del out[i]
            else:
                out.insert(i, out[i])
        text = (" " if " " in reason.strip() else "").join(out)
        if text != reason:
            return text
    return reason + " " + words[-1]


def _malformed(action: str, reason: str, rng: random.Random) -> str:
    good = format_advice(action, reason)
    kind = rng.choice(("truncate", "unbalanced", "single_quotes", "unquoted_key"))
    if kind == "truncate":
        text = good[: rng.randint(1, len(good) - 2)]
    elif kind == "unbalanced":
        text = good[:-1]
    elif kind == "single_quotes":
        text = good.replace('"', "'")
    else:
        text = good.replace('"action"', "action", 1)
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return text
    return good[:-1]  # always broken, whatever the reason text held


def make_rejected(strategy: str, action: str, reason: str, language: str, rng: random.Random) -> str:
    others = [a for a in ACTIONS if a != action]
    if strategy == "wrong_action":
        other = rng.choice(others)
        return format_advice(other, rule_reason(other, language))
    if strategy == "mismatched_reason":
        return format_advice(action, rule_reason(rng.choice(others), language))
    if strategy == "corrupted_reason":
        return format_advice(action, _corrupt(reason, rng))
    if strategy == "malformed_json":
        return _malformed(action, reason, rng)
    if strategy == "missing_action":
        return json.dumps({"reason": reason}, ensure_ascii=False)
    if strategy == "off_topic":
        return rng.choice(OFF_TOPIC[language])
    raise ValueError(f"unknown strategy {strategy!r}")


def weighted_strategy(rng: random.Random, weights: dict[str, float]) -> str:
    names = [s for s in STRATEGIES if weights.get(s, 0) > 0]
    return rng.choices(names, weights=[weights[s] for s in names])[0]
