"""Sampling answers from a policy, and its agreement with the rule teacher (`rlhf.chips.rule.judge`).

Used by PPO (before/after agreement), `rlhf eval` and the report, so "agreement" means one thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.chips import ACTIONS, judge
from rlhf.models import stop_token_ids
from rlhf.models.decoder import key_values, next_token_logits, supports_lean
from rlhf.models.tokens import chat_prompt_ids, left_pad


@dataclass
class Generated:
    query: torch.Tensor  # [B, Tq] left-padded prompt ids
    query_mask: torch.Tensor
    response: torch.Tensor  # [B, Tr] sampled ids (pad after the stop token)
    texts: list[str]  # decoded responses, cut at the stop token
    has_stop: list[bool]
    logprobs: torch.Tensor | None = None  # [B, Tr] log p(token) at the temperature, with record_logprobs
    entropy: torch.Tensor | None = None  # [B, Tr] entropy of each step's distribution, with record_logprobs
    prompt_state: Any = None  # keys and values of query[:, :-1], with keep_prompt_state


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[list[dict[str, str]]], *, max_new_tokens: int,
             do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             prompt_ids: list[list[int]] | None = None, record_logprobs: bool = False,
             keep_prompt_state: bool = False, prompt_state_grad: bool = False) -> Generated:
    """Sample (or greedily decode) answers, one token per step with the keys and values kept, until
    every row has stopped; `prompt_ids`: the prompts already rendered and tokenized.

    Sampling is exactly what the arguments say (temperature, then top-k, then top-p), never a
    model's own generation_config defaults (transformers' generate() applied a model's
    repetition_penalty, 1.05 in Qwen2.5-Instruct's, which PPO's log-probs would not know about).
    `record_logprobs` (sampling only): also each sampled token's log-prob and each step's entropy
    under the whole distribution at the temperature, which is what a forward pass over the finished
    rollout gives.

    keep_prompt_state (models where rlhf.models.decoder.supports_lean holds): also return the keys and
    values of every prompt token but the last, computed with gradients if `prompt_state_grad`, so a
    forward over the rest (the last prompt token and the response) can continue from them instead of
    running the prompt again."""
    stops = stop_token_ids(tok)
    query, query_mask = left_pad(prompt_ids or chat_prompt_ids(tok, prompts), tok.pad_token_id)
    device = next(model.parameters()).device
    warpers = _warpers(do_sample, top_k, top_p)
    stop_ids = torch.tensor(stops, device=device)
    att = query_mask.to(device)
    logits, past, prompt_state = _prompt_forward(model, query, att, keep_prompt_state, prompt_state_grad)
    finished = torch.zeros(len(query), dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    entropy: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = logits.float()
        if do_sample:
            token = _sample(logits, temperature, warpers, record_logprobs, logprobs, entropy)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, tok.pad_token_id)  # rows that have stopped get padding
        tokens.append(token)
        finished |= torch.isin(token, stop_ids)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
        logits, past = next_token_logits(model, token[:, None], att, past)
    response = torch.full((len(query), max_new_tokens), tok.pad_token_id, dtype=torch.long)
    response[:, :len(tokens)] = torch.stack(tokens, 1).cpu()
    recorded = {}
    if do_sample and record_logprobs:
        for name, steps in (("logprobs", logprobs), ("entropy", entropy)):
            recorded[name] = torch.zeros(response.shape)
            recorded[name][:, :len(steps)] = torch.stack(steps, 1).float().cpu()
    texts, has_stop = _decode(tok, response, stops)
    return Generated(query, query_mask, response, texts, has_stop, **recorded, prompt_state=prompt_state)


def _warpers(do_sample: bool, top_k: int, top_p: float) -> list[Any]:
    """Top-k, then top-p, each only when sampling and switched on."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    return [w for w in (TopKLogitsWarper(top_k) if do_sample and top_k else None,
                        TopPLogitsWarper(top_p) if do_sample and top_p < 1.0 else None) if w is not None]


def _prompt_forward(model: Any, query: torch.Tensor, att: torch.Tensor, keep_prompt_state: bool,
                    prompt_state_grad: bool) -> tuple[torch.Tensor, Any, Any]:
    """The first step's logits and keys and values, and with `keep_prompt_state` (where the lean
    forward runs) the prompt state: the keys and values of every prompt token but the last."""
    device = att.device
    prompt_state = None
    if keep_prompt_state and query.shape[1] > 1 and supports_lean(model):
        with torch.set_grad_enabled(prompt_state_grad):
            prompt_state = key_values(model, query[:, :-1].to(device), att[:, :-1])
        logits, past = next_token_logits(model, query[:, -1:].to(device), att, prompt_state)
    else:
        logits, past = next_token_logits(model, query.to(device), att)
    return logits, past, prompt_state


def _sample(logits: torch.Tensor, temperature: float, warpers: list[Any], record_logprobs: bool,
            logprobs: list[torch.Tensor], entropy: list[torch.Tensor]) -> torch.Tensor:
    """One token per row drawn from float `logits` at `temperature` through `warpers`; with
    `record_logprobs`, the step's entropy and the token's log-prob under the whole distribution are
    appended to `entropy` and `logprobs`."""
    logits = logits / temperature
    if record_logprobs:
        logp = torch.log_softmax(logits, -1)
        entropy.append(-(logp.exp() * logp).sum(-1))
    for warp in warpers:
        logits = warp(None, logits)
    token = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
    if record_logprobs:
        logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
    return token


def _decode(tok: Any, response: torch.Tensor, stops: list[int]) -> tuple[list[str], list[bool]]:
    """Each row's text, cut at its first stop token, and whether it had one."""
    texts, has_stop = [], []
    for row in response.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        has_stop.append(cut is not None)
        texts.append(tok.decode(row[:cut] if cut is not None else row, skip_special_tokens=True))
    return texts, has_stop


def evaluate_policy(model: Any, tok: Any, prompts: list[list[dict[str, str]]], *, do_sample: bool,
                    temperature: float = 1.0, max_new_tokens: int = 48, batch_size: int = 64,
                    seed: int = 0, n_samples: int = 4) -> dict[str, Any]:
    """Agreement with the rule teacher (invalid JSON counts as disagreement), JSON validity,
    action shares, mean response length and a few sample answers."""
    was_training = model.training
    model.eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # evaluation must not depend on (or disturb) the training RNG stream
    agree = valid = 0
    lengths: list[int] = []
    shares = dict.fromkeys(ACTIONS, 0)
    samples: list[dict[str, str]] = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        g = generate(model, tok, batch, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature)
        for p, text, stop in zip(batch, g.texts, g.has_stop):
            ok, agrees, action = judge(p[-1]["content"], text, stop)
            valid += ok
            agree += agrees
            lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
            if action:
                shares[action] += 1
            if len(samples) < n_samples:
                samples.append({"prompt": p[-1]["content"], "response": text})
    torch.random.set_rng_state(gen_state)
    if was_training:
        model.train()
    n = max(1, len(prompts))
    return {"agreement": agree / n, "json_valid": valid / n, "mean_length": sum(lengths) / n,
            "action_share": {k: v / n for k, v in shares.items()}, "samples": samples}


