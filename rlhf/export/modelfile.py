"""The Ollama side of an export: a ChatML Go template matching the model's Jinja template, stop
parameters, and the Modelfile that ties them to the GGUF.

Ollama's Modelfile parser (parser/parser.go) reads a `#` comment up to the next CR or LF, an
unquoted value up to the next line break, and a quoted or triple-quoted value up to the first line
break where the text so far ends in its closing quote(s); it drops every non-printable character
except tab and line breaks. Every string written here is checked or escaped against those rules, so
the file says exactly the instructions `render` meant, whatever the model path or system prompt.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf.errors import UserError
from rlhf.models.chatml import IM_END, IM_START

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


_LINE_BREAKS = "\r\n"
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+")  # what the parser's parameter state accepts


def _kept(ch: str, line_breaks: bool) -> bool:
    """Whether Ollama's parser keeps `ch` in a value: Go's strconv.IsPrint, which is Python's
    str.isprintable (letters, marks, numbers, punctuation, symbols, ASCII space), plus tab and,
    inside a triple-quoted block, line breaks."""
    return ch.isprintable() or ch == "\t" or (line_breaks and ch in _LINE_BREAKS)


def _first_lost(text: str, line_breaks: bool) -> str | None:
    bad = next((c for c in text if not _kept(c, line_breaks)), None)
    return None if bad is None else f"the character {bad!r} (at {text.index(bad)})"


def comment(text: str) -> str:
    """`text` as one comment line: a line break would end the comment and let the rest be read as
    instructions, so every character the parser would not keep on the line is written escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def check_block(keyword: str, text: str, where: str) -> None:
    """Raise UserError unless `text` reads back whole from a triple-quoted KEYWORD block."""
    if '"""' in text:
        raise UserError(f'{where}: the text holds """, which ends a Modelfile {keyword} block early; remove it')
    lost = _first_lost(text, line_breaks=True)
    if lost:
        raise UserError(f"{where}: the text holds {lost}, which Ollama's Modelfile parser drops; remove it")


def _quoted_block(keyword: str, text: str, where: str) -> str:
    check_block(keyword, text, where)
    return f'{keyword} """{text}"""'


def _parameter(key: str, value: Any) -> str:
    if not _PARAM_NAME.fullmatch(key):
        raise ValueError(f"Modelfile parameter name {key!r}: letters, digits and '_' only")
    if not isinstance(value, str):
        return f"PARAMETER {key} {value}"
    lost = _first_lost(value, line_breaks=False)  # a line break could close the quotes and start an instruction
    if lost:
        raise UserError(f"PARAMETER {key} {value!r}: the value holds {lost}, which a Modelfile line cannot hold")
    return f'PARAMETER {key} "{value}"'


def render(gguf_file: str, template: str, params: dict[str, Any], system: str | None, source: str, *,
           system_source: str = "--system") -> str:
    """Modelfile text; `gguf_file` is relative to the Modelfile's folder (`ollama create -f` resolves it).
    `source` (any text) goes into the header comment; `system_source` names where `system` came from."""
    if (not gguf_file or gguf_file.strip() != gguf_file or _first_lost(gguf_file, line_breaks=False)
            or any(c in gguf_file for c in '"/\\')):
        raise UserError(f"--name: the GGUF file name {gguf_file!r} cannot stand on a Modelfile's FROM line (it holds "
                        "a quote, slash, line break or control character); pass a plain --name, e.g. chip-advisor")
    lines = [f"# Written by `rlhf export` from {comment(source)}", f"FROM ./{gguf_file}",
             _quoted_block("TEMPLATE", template, "the chat template")]
    if system:
        lines.append(_quoted_block("SYSTEM", system, system_source))
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(_parameter(key, v))
    return "\n".join(lines) + "\n"
