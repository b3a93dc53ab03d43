"""Does the exported GGUF answer as the model it came from? Greedy answers on held-out prompts,
transformers (the merged hf/ folder, f32) against llama.cpp (llama-cpp-python, Ollama's runtime)
reading the GGUF, plus the token ids each side makes of every prompt.

What can differ: the tokenizer (a wrong `tokenizer.ggml.pre` splits digits differently, and a chip
prompt is mostly digits), and rounding (f16, q8_0) that flips a near-tied greedy token. The first
shows as `tokenization_identical` < 1; the second as answers that part after a shared start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf.chips.rule import judge
from rlhf.errors import UserError
from rlhf.generation import Messages, generate, until_stop
from rlhf.models import stop_token_ids
from rlhf.models.tokens import chat_ids

BATCH = 16  # transformers' greedy answers, prompts per batch


def _llama(gguf_path: Path, context: int) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("export: --verify_data needs llama-cpp-python (`pip install llama-cpp-python`, "
                        "or bash scripts/setup_env.sh); or leave --verify_data unset") from None
    threads = max(1, torch.get_num_threads())
    # logits_all: without it llama-cpp-python 0.3.36 leaves `scores` of the last position zero
    return Llama(model_path=str(gguf_path), n_ctx=context, n_batch=context, logits_all=True, verbose=False, seed=0,
                 n_threads=threads, n_threads_batch=threads)


def _hf_answers(model: Any, tok: Any, prompts: list[Messages], prompt_ids: list[list[int]], stops: set[int],
                max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy answer token ids, cut before the stop token."""
    answers: list[list[int]] = []
    for i in range(0, len(prompts), BATCH):
        out = generate(model, tok, prompts[i:i + BATCH], prompt_ids=prompt_ids[i:i + BATCH],
                       max_new_tokens=max_new_tokens, do_sample=False)
        answers += [until_stop(row, stops)[0] for row in out.response.tolist()]
    return answers


def _cpp_answer(llm: Any, ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """llama.cpp's own greedy loop (its KV cache, token by token), cut before the stop token."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in stops:
            break
        new.append(nxt)
        llm.eval([nxt])
    return new


def verify_gguf(hf_dir: Path, gguf_path: Path, prompts: list[Messages], *, max_new_tokens: int) -> dict[str, Any]:
    """Share of `prompts` on which llama.cpp tokenizes the rendered prompt as transformers does,
    and on which its greedy answer is token-for-token transformers' (and names the same action)."""
    from rlhf.models import ModelOptions, load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(hf_dir))
    stops = set(stop_token_ids(tok))
    hf_ids = [chat_ids(tok, p, add_generation_prompt=True) for p in prompts]
    model = load_causal_lm(str(hf_dir), ModelOptions(dtype="float32", use_lora=False)).eval()
    hf = _hf_answers(model, tok, prompts, hf_ids, stops, max_new_tokens)
    del model
    llm = _llama(gguf_path, context=max(map(len, hf_ids)) + max_new_tokens + 8)
    same_tokens = same_answer = same_action = 0
    first_difference: dict[str, str] | None = None
    try:
        for prompt, ids, hf_answer in zip(prompts, hf_ids, hf):
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            same_tokens += llm.tokenize(text.encode(), add_bos=True, special=True) == ids
            cpp_answer = _cpp_answer(llm, ids, max_new_tokens, stops)
            same_answer += cpp_answer == hf_answer
            hf_text, cpp_text = tok.decode(hf_answer), tok.decode(cpp_answer)
            content = prompt[-1]["content"]
            same_action += judge(content, hf_text)[2] == judge(content, cpp_text)[2]
            if cpp_answer != hf_answer and first_difference is None:
                first_difference = {"prompt": content, "transformers": hf_text, "llama_cpp": cpp_text}
    finally:
        llm.close()
    n = len(prompts)
    return {"prompts": n, "tokenization_identical": same_tokens / n, "answers_identical": same_answer / n,
            "actions_identical": same_action / n, "max_new_tokens": max_new_tokens,
            "first_difference": first_difference}
