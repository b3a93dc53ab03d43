"""Sampling answers from a policy (`generate`), and the one held-out evaluation of a policy
(`evaluate_model`: greedy and sampled answers judged by the rule teacher, `rlhf.chips.rule.judge`).

PPO's rollouts sample through `generate`; `rlhf sft` (agreement after SFT), `rlhf ppo` (before and
after) and `rlhf eval` all evaluate through `evaluate_model`, so "agreement" means one thing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rlhf.chips import ACTIONS, judge
from rlhf.models import stop_token_ids
from rlhf.models.decoder import key_values, next_token_logits, supports_lean
from rlhf.models.tokens import chat_prompt_ids, left_pad

Messages = list[dict[str, str]]
Pass = Literal["greedy", "sampled"]
ScoreFn = Callable[[list[Messages], list[str], list[bool]], torch.Tensor]  # a reward source, as in rlhf.rewards


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
def generate(model: Any, tok: Any, prompts: list[Messages], *, max_new_tokens: int,
             do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             prompt_ids: list[list[int]] | None = None, record_logprobs: bool = False,
             keep_prompt_state: bool = False, prompt_state_grad: bool = False, group: int = 1) -> Generated:
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
    running the prompt again.

    group: the rows come in runs of `group` with one prompt (a prompt's samples); on lean models
    without keep_prompt_state, each prompt's first forward runs once for its run."""
    stops = stop_token_ids(tok)
    query, query_mask = left_pad(prompt_ids or chat_prompt_ids(tok, prompts), tok.pad_token_id)
    device = next(model.parameters()).device
    warpers = _warpers(do_sample, top_k, top_p)
    stop_ids = torch.tensor(stops, device=device)
    att = query_mask.to(device)
    if group > 1 and not keep_prompt_state and supports_lean(model):
        (logits, past), prompt_state = _shared_prompt_forward(model, query, att, group), None
    else:
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


def _shared_prompt_forward(model: Any, query: torch.Tensor, att: torch.Tensor, group: int) -> tuple[torch.Tensor, Any]:
    """The first step's logits and keys and values of rows in runs of `group` with one prompt,
    computed once per run and repeated to its rows (the prompt is the longest forward of sampling)."""
    if len(query) % group or not torch.equal(query, query[::group].repeat_interleave(group, 0)):
        raise ValueError(f"rows do not come in runs of {group} with one prompt")
    logits, past = next_token_logits(model, query[::group].to(att.device), att[::group])
    return logits.repeat_interleave(group, 0), [(k.repeat_interleave(group, 0), v.repeat_interleave(group, 0))
                                                for k, v in past]


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


def until_stop(row: list[int], stops: Collection[int]) -> tuple[list[int], bool]:
    """A response row's ids before its first stop token, and whether it had one."""
    cut = next((i for i, t in enumerate(row) if t in stops), None)
    return (row, False) if cut is None else (row[:cut], True)


def _decode(tok: Any, response: torch.Tensor, stops: list[int]) -> tuple[list[str], list[bool]]:
    """Each row's text, cut at its first stop token, and whether it had one."""
    texts, has_stop = [], []
    for row in response.tolist():
        ids, stopped = until_stop(row, stops)
        has_stop.append(stopped)
        texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts, has_stop


def evaluate_model(model: Any, tok: Any, prompts: list[Messages], *, max_new_tokens: int, seed: int,
                   temperature: float = 1.0, modes: tuple[Pass, ...] = ("greedy", "sampled"), batch_size: int = 64,
                   n_samples: int = 4, score: ScoreFn | None = None,
                   on_batch: Callable[[Generated], None] | None = None, draws: int = 1) -> dict[str, dict[str, Any]]:
    """The held-out evaluation of a policy, one pass per mode: 'greedy', and 'sampled' at `temperature`.
    Each pass: {agreement, json_valid, mean_length, action_share, samples} of `judge_answers`, and
    its answers (texts, has_stop). The sampled pass only, as PPO and `rlhf eval` measure them on
    sampled answers: reward_mean, the mean of `score` (a reward source, (prompts, texts, has_stop)
    -> scores) over its answers, and `on_batch` called with each batch as generated.
    draws: answers the sampled pass draws per prompt (each prompt's in a row), and its means are
    over all of them: one answer on each of 100 prompts at agreement ~0.3 has a standard error of
    0.046, four answers 0.023 (less, by how much a prompt's answers agree among themselves).

    Every pass starts from `seed` (greedy decoding draws no random numbers), in eval mode; the
    caller's RNG state and train/eval mode are restored after, so evaluation neither depends on nor
    disturbs the training's RNG stream."""
    was_training = model.training
    model.eval()
    rng = torch.random.get_rng_state()
    out: dict[str, dict[str, Any]] = {}
    try:
        for mode in modes:
            torch.manual_seed(seed)
            sampled = mode == "sampled"
            asked = [p for p in prompts for _ in range(draws)] if sampled else prompts
            out[mode] = _judged_pass(model, tok, asked, sampled, temperature, max_new_tokens,
                                     batch_size, n_samples, score, on_batch)
    finally:
        torch.random.set_rng_state(rng)
        if was_training:
            model.train()
    return out


def _judged_pass(model: Any, tok: Any, prompts: list[Messages], do_sample: bool, temperature: float,
                 max_new_tokens: int, batch_size: int, n_samples: int, score: ScoreFn | None,
                 on_batch: Callable[[Generated], None] | None) -> dict[str, Any]:
    """One pass of `evaluate_model`: answers in batches, then judged (and scored, when sampling)."""
    texts: list[str] = []
    has_stop: list[bool] = []
    for i in range(0, len(prompts), batch_size):
        g = generate(model, tok, prompts[i:i + batch_size], max_new_tokens=max_new_tokens, do_sample=do_sample,
                     temperature=temperature)
        texts += g.texts
        has_stop += g.has_stop
        if do_sample and on_batch is not None:
            on_batch(g)
    result = judge_answers(prompts, texts, has_stop, length_tok=tok, n_samples=n_samples)
    result.update(texts=texts, has_stop=has_stop)
    if do_sample and score is not None:
        result["reward_mean"] = float(score(prompts, texts, has_stop).mean())
    return result


def judge_answers(prompts: list[Messages], texts: list[str], has_stop: list[bool], *,
                  length_tok: Any = None, n_samples: int = 4) -> dict[str, Any]:
    """Agreement with the rule teacher (invalid JSON counts as disagreement), JSON validity, action
    shares, mean length in tokens of `length_tok` (None without one) and the first `n_samples` answers."""
    agree = valid = 0
    lengths: list[int] = []
    shares = dict.fromkeys(ACTIONS, 0)
    samples: list[dict[str, str]] = []
    for p, text, stop in zip(prompts, texts, has_stop):
        ok, agrees, action = judge(p[-1]["content"], text, stop)
        valid += ok
        agree += agrees
        if length_tok is not None:
            lengths.append(len(length_tok(text, add_special_tokens=False)["input_ids"]))
        if action:
            shares[action] += 1
        if len(samples) < n_samples:
            samples.append({"prompt": p[-1]["content"], "response": text})
    n = max(1, len(prompts))
    return {"agreement": agree / n, "json_valid": valid / n,
            "mean_length": sum(lengths) / n if length_tok is not None else None,
            "action_share": {k: v / n for k, v in shares.items()}, "samples": samples}
