"""Scoring text with a trained reward model (scalar head): the one room for it.

`score_ids` / `score_texts` give the raw score read at the last token; `reward_normalization` reads
the held-out mean and std the reward stage wrote (`NORMALIZATION_FILE`, next to the model);
`ModelReward` loads a reward model once and scores prompt + answer, standardised by them. PPO's
`model` reward source, `rlhf eval`'s reward_mean and `rlhf score` score through here; the reward
stage (`rlhf.reward`) trains the model and writes the normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError

Messages = list[dict[str, str]]

NORMALIZATION_FILE = "reward_normalization.json"


def reward_normalization(model_dir: str | Path) -> tuple[float, float] | None:
    """(mean, std) of the reward model's held-out scores, as the reward stage wrote them; None if absent."""
    path = Path(model_dir) / NORMALIZATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return float(data["mean"]), max(float(data["std"]), 1e-6)


@torch.no_grad()
def score_texts(model: Any, tok: Any, conversations: list[Messages], batch_size: int = 64) -> list[float]:
    """Reward of each full conversation (prompt + assistant answer), rendered with the chat template."""
    from rlhf.models.tokens import chat_ids

    return score_ids(model, tok, [chat_ids(tok, c, add_generation_prompt=False) for c in conversations], batch_size)


@torch.no_grad()
def score_ids(model: Any, tok: Any, sequences: list[list[int]], batch_size: int = 64) -> list[float]:
    """Reward of each token sequence, read at its last token."""
    from rlhf.models.decoder import head_outputs
    from rlhf.models.tokens import left_pad

    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(sequences), batch_size):
        ids, att = left_pad(sequences[i:i + batch_size], tok.pad_token_id)  # the last token at the end of every row
        scores += head_outputs(model, ids.to(device), att.to(device), 1)[:, 0, 0].float().cpu().tolist()
    return scores


class ModelReward:
    """The trained reward model (scalar head). With `normalize`, scores are standardised by the
    mean/std the reward stage measured on held-out answers, so they are near N(0, 1).

    `unfinished` says how an answer cut off before its stop token is shown to the reward model:
    'closed' renders it like a finished one (the chat template closes the turn, so the reward model
    cannot see the cut; pair it with PPO's missing_eos_penalty), 'open' scores the tokens as generated,
    the turn left open, as TRL does. `flag`: the option that named `path`, for the refusal of a
    folder that holds no reward model."""

    def __init__(self, path: str, device: torch.device | str = "cpu", batch_size: int = 64,
                 dtype: str = "float32", normalize: bool = True, unfinished: str = "closed",
                 flag: str = "--reward_model") -> None:
        if unfinished not in ("closed", "open"):
            raise UserError(f"score_unfinished must be 'closed' or 'open', got {unfinished!r}")
        self.unfinished = unfinished
        from rlhf.models import ModelOptions, load_reward_model, load_tokenizer

        self.tok = load_tokenizer(path, padding_side="right")
        self.model = load_reward_model(path, ModelOptions(dtype=dtype, use_lora=False),
                                       pad_token_id=self.tok.pad_token_id, flag=flag).to(device).eval()
        self.model.requires_grad_(False)
        self.batch_size = batch_size
        stats = reward_normalization(path) if normalize else None
        self.shift, self.scale = stats or (0.0, 1.0)

    def __call__(self, prompts: list[Messages], responses: list[str], has_stop: list[bool]) -> torch.Tensor:
        from rlhf.models.tokens import chat_ids

        seqs = []
        for prompt, response, stopped in zip(prompts, responses, has_stop):
            if stopped or self.unfinished == "closed":  # rendered as the reward model saw answers in training
                seqs.append(chat_ids(self.tok, prompt + [{"role": "assistant", "content": response}],
                                     add_generation_prompt=False))
            else:
                seqs.append(chat_ids(self.tok, prompt, add_generation_prompt=True)
                            + self.tok(response, add_special_tokens=False)["input_ids"])
        return (torch.tensor(score_ids(self.model, self.tok, seqs, self.batch_size)) - self.shift) / self.scale

    def conversations(self, conversations: list[Messages]) -> list[float]:
        """The score of each whole conversation (the answer may be several messages), standardised
        like `__call__`'s."""
        return [(s - self.shift) / self.scale for s in score_texts(self.model, self.tok, conversations,
                                                                    self.batch_size)]
