"""Prompt templates for the `dims` variant, in English and Chinese (the seed's language)."""

from __future__ import annotations

import re

from rlhf.chips.spec import ChipSpec

LANGUAGES = ("en", "zh")

TEMPLATES = {
    # Short on purpose: every prompt token is paid for in each PPO forward pass (measured: 83 -> 59
    # tokens per sequence, 1.4x faster updates). SFT teaches the format; Ollama teachers get the
    # schema as structured-output `format`, and the zh template keeps the seed's full instructions.
    "en": "A chip measures [length, width, height] = {dims} mm. Recommend an adjustment as JSON.",
    "zh": ("你是芯片设计顾问。芯片尺寸 [长度, 宽度, 高度] = {dims} mm。请输出 JSON "
           '{{"action": "increase"(增大) / "decrease"(减小) / "no_change"(不动), "reason": "理由"}}。'),
}

_DIMS = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")


def dims_prompt(spec: ChipSpec, language: str = "en") -> str:
    if language not in TEMPLATES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    return TEMPLATES[language].format(dims=f"[{spec.length}, {spec.width}, {spec.height}]")


def prompt_language(text: str) -> str:
    """The template a prompt was written in: 'zh' when it holds CJK characters, else 'en'."""
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


def spec_from_prompt(text: str) -> ChipSpec | None:
    """Recover the chip from a prompt (the last [l, w, h] in it), so rule rewards need no metadata."""
    found = _DIMS.findall(text)
    if not found:
        return None
    length, width, height = map(int, found[-1])
    return ChipSpec(length, width, height)
