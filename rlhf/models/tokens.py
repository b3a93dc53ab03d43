"""Token ids of chats: a chat rendered with the model's template, and prompts left-padded into a batch.

Shared by the data checks, the reward model, the sampler and PPO's rollout, so a prompt is tokenized
one way everywhere.
"""

from __future__ import annotations

from typing import Any

import torch


def chat_ids(tok: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of a chat rendered with the model's template (transformers 5 returns a dict)."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def chat_prompt_ids(tok: Any, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    return [chat_ids(tok, p, add_generation_prompt=True) for p in prompts]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
        att[i, n - len(s):] = 1
    return ids, att
