"""The Ollama side of an export: a ChatML Go template matching the model's Jinja template, stop
parameters, and the Modelfile that ties them to the GGUF."""

from __future__ import annotations

import re
from typing import Any

from rlhf.errors import UserError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
STOPS = [IM_START, IM_END]

# ChatML over .Messages, as Ollama's Qwen2.5 template: the system prompt (a request's system
# messages, or the Modelfile's SYSTEM) first, then every user/assistant turn, then an open
# assistant turn. Rendered output equals the HF ChatML template for the same messages.
CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{ if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{ end }}<|im_start|>assistant\n"
)


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def default_system(tok: Any, model_name: str) -> str | None:
    """The system prompt the model's HF template inserts when none is given (SmolLM2 and Qwen2.5
    have one), so the Ollama model behaves the same. Raises UserError for a non-ChatML template."""
    vocab = tok.get_vocab()
    if IM_START not in vocab or IM_END not in vocab:
        raise UserError(f"{model_name}: the tokenizer has no {IM_START}/{IM_END} tokens; export writes a ChatML "
                        "Ollama template and needs a ChatML model (Qwen2.5, SmolLM2, rlhf tiny-model)")
    if not getattr(tok, "chat_template", None):
        return None  # no template of its own: the ChatML one is the model's
    probe = [{"role": "user", "content": "PROBE"}]
    rendered = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    plain = chatml(probe)
    if rendered == plain:
        return None
    m = re.fullmatch(re.escape(IM_START) + r"system\n(.*?)" + re.escape(IM_END) + r"\n" + re.escape(plain),
                     rendered, flags=re.S)
    if m:
        return m.group(1)
    raise UserError(f"{model_name}: its chat template is not ChatML (it renders {rendered[:80]!r}); "
                    "export writes a ChatML Ollama template and would not match it")


def parameters(stop: list[str], temperature: float | None, top_p: float | None, top_k: int | None,
               num_ctx: int | None, repeat_penalty: float | None) -> dict[str, Any]:
    params: dict[str, Any] = {"stop": list(stop)}
    for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                       ("num_ctx", num_ctx), ("repeat_penalty", repeat_penalty)):
        if value is not None:
            params[key] = value
    return params


def _quoted_block(keyword: str, text: str) -> str:
    if '"""' in text:
        raise UserError(f'{keyword.lower()}: the text may not contain """ (it ends a Modelfile block)')
    return f'{keyword} """{text}"""'


def render(gguf_file: str, template: str, params: dict[str, Any], system: str | None, source: str) -> str:
    """Modelfile text; `gguf_file` is relative to the Modelfile's folder (`ollama create -f` resolves it)."""
    lines = [f"# Written by `rlhf export` from {source}", f"FROM ./{gguf_file}", _quoted_block("TEMPLATE", template)]
    if system:
        lines.append(_quoted_block("SYSTEM", system))
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f'PARAMETER {key} "{v}"' if isinstance(v, str) else f"PARAMETER {key} {v}")
    return "\n".join(lines) + "\n"
