"""ChatML as Qwen2.5 writes it, named once: its special tokens, its Jinja chat template and Qwen2's
pre-tokenizer regex.

`rlhf tiny-model` builds its tokenizer from them; the GGUF writer recognises a Qwen2 tokenizer.json by
the same regex (a copy that drifted would silently give llama.cpp the wrong pre-tokenizer) and writes
the same template into a GGUF whose model has none. Loading and SFT end an answer at IM_END, the Ollama
Modelfile stops at IM_START and IM_END.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"  # Qwen2.5's pad token (and its base models' EOS)

# Qwen2.5's ChatML (without its default system prompt, as Ollama's template for it).
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split, exactly as its tokenizer.json writes it: one digit per piece (\p{N}).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
