"""The chip domain: rule balance, prompts (en/zh), spec round trip, advice parsing."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rlhf.chips import (
    ACTIONS,
    ADVICE_SCHEMA,
    AdviceParseError,
    ChipSpec,
    dims_prompt,
    format_advice,
    parse_advice,
    prompt_language,
    rule_action,
    rule_advice,
    rule_reason,
    sample_specs,
    spec_from_prompt,
)


# -- the rule teacher -------------------------------------------------------------------------------
def test_rule_classes_are_near_equal_over_heights():
    counts = Counter(rule_action(ChipSpec(50, 50, h)) for h in range(1, 101))
    assert set(counts) == set(ACTIONS)
    assert all(32 <= c <= 35 for c in counts.values()), counts


def test_rule_is_monotone_in_height_and_ignores_the_rest():
    order = {"increase": 0, "no_change": 1, "decrease": 2}
    seq = [order[rule_action(ChipSpec(7, 9, h))] for h in range(1, 101)]
    assert seq == sorted(seq) and seq[0] == 0 and seq[-1] == 2
    assert all(rule_action(ChipSpec(length, width, 50)) == rule_action(ChipSpec(1, 1, 50))
               for length in (1, 50, 100) for width in (1, 100))


def test_rule_advice_carries_its_reason_in_both_languages():
    for lang in ("en", "zh"):
        reasons = {rule_reason(a, lang) for a in ACTIONS}
        assert len(reasons) == 3 and all(reasons)
        advice = rule_advice(ChipSpec(1, 1, 90), lang)
        assert advice.reason == rule_reason(advice.action, lang)
    with pytest.raises(ValueError, match="unknown rule"):
        rule_action(ChipSpec(1, 1, 1), rule="max")


def test_sample_specs_distinct_deterministic_in_range():
    a, b = sample_specs(500, seed=4), sample_specs(500, seed=4)
    assert a == b and len(set(a)) == 500 and a != sample_specs(500, seed=5)
    assert all(1 <= v <= 100 for s in a for v in s.as_list())
    excluded = set(a[:100])
    assert not excluded & set(sample_specs(200, seed=9, exclude=excluded))
    with pytest.raises(ValueError):
        sample_specs(9, seed=0, lo=1, hi=2)


# -- prompts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_prompt_round_trips_the_spec(lang):
    for spec in sample_specs(50, seed=1):
        prompt = dims_prompt(spec, lang)
        assert f"[{spec.length}, {spec.width}, {spec.height}]" in prompt
        assert spec_from_prompt(prompt) == spec
        assert prompt_language(prompt) == lang  # what the action-offset probe answers in


def test_prompts_differ_by_language():
    spec = ChipSpec(12, 34, 56)
    en, zh = dims_prompt(spec, "en"), dims_prompt(spec, "zh")
    assert en != zh
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh) and not any("\u4e00" <= ch <= "\u9fff" for ch in en)
    with pytest.raises(ValueError, match="language"):
        dims_prompt(spec, "fr")


def test_spec_from_prompt_takes_the_last_triple_or_none():
    assert spec_from_prompt("was [1, 2, 3], now [4,5 , 6] mm") == ChipSpec(4, 5, 6)
    assert spec_from_prompt("no dimensions here") is None


# -- advice format and parsing -----------------------------------------------------------------------
def test_format_advice_is_strictly_parseable():
    for action in ACTIONS:
        text = format_advice(action, rule_reason(action, "zh"))
        assert json.loads(text) == {"action": action, "reason": rule_reason(action, "zh")}
        assert parse_advice(text, strict=True).action == action
    assert ADVICE_SCHEMA["properties"]["action"]["enum"] == list(ACTIONS)


@pytest.mark.parametrize(("text", "action"), [
    ('```json\n{"action": "increase", "reason": "r"}\n```', "increase"),
    ('Answer: {"action": "Decrease", "reason": "r"} thanks', "decrease"),
    ('{"action": "no change", "reason": "r"}', "no_change"),
    ('{"action": "增大", "reason": 5}', "increase"),
])
def test_lenient_parse_accepts_what_real_models_write(text, action):
    advice = parse_advice(text)
    assert advice.action == action
    with pytest.raises(AdviceParseError):
        parse_advice(text, strict=True)


@pytest.mark.parametrize(("text", "reason"), [
    ("not json at all", "not_json"),
    ('{"action": "increase", "reason": "r"', "not_json"),
    ('{"reason": "r"}', "missing_action"),
    ('{"action": "grow", "reason": "r"}', "bad_action"),
    ('[{"action": "increase"}]', "not_object"),
    ('{"action": "increase", "reason": 3}', "bad_reason"),
])
def test_strict_parse_rejects_with_a_reason(text, reason):
    with pytest.raises(AdviceParseError) as e:
        parse_advice(text, strict=True)
    assert e.value.reason == reason


def test_lenient_parse_still_rejects_garbage():
    for text in ("nothing here", '{"reason": "r"}', '{"action": "sideways"}'):
        with pytest.raises(AdviceParseError):
            parse_advice(text)
    with pytest.raises(AdviceParseError, match="not_text"):
        parse_advice(None)  # type: ignore[arg-type]
