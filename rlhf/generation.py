"""Sampling answers from a policy and judging them against the rule teacher.

Used by PPO (before/after agreement), `rlhf eval` and the report, so "agreement" means one thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.chips import ACTIONS, AdviceParseError, parse_advice, rule_action, spec_from_prompt
from rlhf.models import stop_token_ids


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


@dataclass
class Generated:
    query: torch.Tensor  # [B, Tq] left-padded prompt ids
    query_mask: torch.Tensor
    response: torch.Tensor  # [B, Tr] sampled ids (pad after the stop token)
    texts: list[str]  # decoded responses, cut at the stop token
    has_stop: list[bool]
    logprobs: torch.Tensor | None = None  # [B, Tr] log p(token) at the temperature, with record_logprobs
    entropy: torch.Tensor | None = None  # [B, Tr] entropy of each step's distribution, with record_logprobs


class LogprobRecorder:
    """A logits processor that applies the temperature itself and records, step by step, the
    log-probability of each sampled token and the entropy, under the full distribution at that
    temperature: what a forward pass over the finished sequence would give, without that pass.
    Memory is one [B, V] step, not [B, T, V]. It sees the raw logits because generate() runs with
    temperature 1 and no warpers of its own; top-k/top-p come after it."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.last: torch.Tensor | None = None  # log-probs of the step whose token is not known yet
        self.logprobs: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:  # the previous step's token is the newest input id
            self.logprobs.append(self.last.gather(1, input_ids[:, -1:]).squeeze(1))
        scores = scores / self.temperature
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.entropy.append(-(logp.exp() * logp).sum(-1))
        self.last = logp
        return scores

    def finish(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, steps] log-probs and entropies; `response` holds the sampled ids, one column per step."""
        steps = len(self.entropy)
        if self.last is not None:
            self.logprobs.append(self.last.gather(1, response[:, steps - 1:steps].to(self.last.device)).squeeze(1))
        return torch.stack(self.logprobs, 1).cpu(), torch.stack(self.entropy, 1).cpu()


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[list[dict[str, str]]], *, max_new_tokens: int,
             do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             prompt_ids: list[list[int]] | None = None, record_logprobs: bool = False) -> Generated:
    """Sample (or greedily decode) answers; `prompt_ids`: the prompts already rendered and tokenized.
    `record_logprobs` (sampling only): also the sampled tokens' log-probs and the entropies at the
    temperature (see LogprobRecorder)."""
    from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

    stops = stop_token_ids(tok)
    query, query_mask = left_pad(prompt_ids or chat_prompt_ids(tok, prompts), tok.pad_token_id)
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"do_sample": do_sample}
    recorder = None
    if do_sample and record_logprobs:
        recorder = LogprobRecorder(temperature)
        chain: list[Any] = [recorder]
        if top_k:
            chain.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p))
        kwargs.update(temperature=1.0, top_k=None, top_p=None, logits_processor=LogitsProcessorList(chain))
    elif do_sample:
        kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
    out = model.generate(input_ids=query.to(device), attention_mask=query_mask.to(device),
                         max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id, **kwargs)
    response = out[:, query.shape[1]:].cpu()
    logprobs = entropy = None
    if recorder is not None:
        logprobs, entropy = recorder.finish(response)
    if response.shape[1] < max_new_tokens:  # all rows stopped early: pad to a fixed width
        pad = torch.full((response.shape[0], max_new_tokens - response.shape[1]), tok.pad_token_id, dtype=torch.long)
        response = torch.cat([response, pad], dim=1)
        if recorder is not None:
            zeros = torch.zeros(pad.shape)
            logprobs, entropy = torch.cat([logprobs, zeros], 1), torch.cat([entropy, zeros], 1)
    texts, has_stop = [], []
    for row in response.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        has_stop.append(cut is not None)
        texts.append(tok.decode(row[:cut] if cut is not None else row, skip_special_tokens=True))
    return Generated(query, query_mask, response, texts, has_stop, logprobs, entropy)


def judge(prompt_text: str, response: str, has_stop: bool = True) -> tuple[bool, bool, str | None]:
    """(valid JSON advice, agrees with the rule teacher, parsed action) for one answer."""
    spec = spec_from_prompt(prompt_text)
    try:
        action = parse_advice(response, strict=True).action if has_stop else None
    except AdviceParseError:
        action = None
    valid = action is not None
    agree = valid and spec is not None and action == rule_action(spec)
    return valid, agree, action


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


