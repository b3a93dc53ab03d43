"""Steps 1-4 of a PPO update: roll out, score, evaluate, shape; what they hand the update is a `Rollout`.

`PromptStream` says which prompts an update samples, `Collector` turns them into a `Rollout`, and
`Rollout.rows` slices the rows one optimizer step learns from (a `Minibatch`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf.chips import action_token_index, judge, rule_action, spec_from_prompt
from rlhf.generation import Generated, generate
from rlhf.models.decoder import (
    KeyValues,
    PromptGroups,
    Trunk,
    frozen_depth,
    group_prompts,
    key_values,
    shared_depth,
    supports_lean,
    trunk_states,
)
from rlhf.models.tokens import chat_ids, left_pad
from rlhf.ppo import core
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.models import PolicyAndValue, Reference
from rlhf.ppo.parallel import Runner

Prompt = list[dict[str, str]]  # chat messages
# (prompts, answer texts, has_stop [B] bool) -> scores [B]
ScoreFn = Callable[[list[Prompt], list[str], torch.Tensor], torch.Tensor]


class PromptStream:
    """Prompts in a seeded order, reshuffled each pass; update u of rank r is a pure function of
    (seed, u, r), so a resumed run sees exactly the prompts it would have seen."""

    def __init__(self, prompts: list[Any], seed: int) -> None:
        self.prompts, self.seed = prompts, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            idx = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._orders = {epoch: idx}
        return self._orders[epoch]

    def batch(self, update: int, batch_size: int, rank: int, world: int, group: int = 1) -> list[Any]:
        """This rank's prompts of one update, each repeated `group` times in a row (a group: the
        samples of one prompt)."""
        per_update, local = batch_size // group, batch_size // world // group
        out = []
        for k in range(update * per_update + rank * local, update * per_update + (rank + 1) * local):
            epoch, i = divmod(k, len(self.prompts))
            out.extend([self.prompts[self._order(epoch)[i]]] * group)
        return out


@dataclass
class Minibatch:
    """The rows of a Rollout that one forward and backward learn from (shapes as in Rollout, B rows)."""

    ids: torch.Tensor
    att: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    n_resp: int
    policy_trunk: Trunk | None = None
    value_trunk: Trunk | None = None
    groups: PromptGroups | None = None


@dataclass
class Rollout:
    """One update's batch, this process's share: B rows (prompts, repeated per samples_per_prompt),
    P prompt columns (left-padded), T = n_resp response columns (trimmed to the longest answer)."""

    prompts: list[Prompt]  # [B] the chat prompts
    texts: list[str]  # [B] the answers, decoded and cut at the stop token
    ids: torch.Tensor  # [B, P+T] long: prompt then response tokens
    att: torch.Tensor  # [B, P+T] long: attention mask (0 on the prompt's left padding)
    response: torch.Tensor  # [B, T] long: the sampled tokens (padding after the stop token)
    mask: torch.Tensor  # [B, T] long: 1 on the tokens that count (up to and including the stop)
    n_resp: int  # T
    has_stop: torch.Tensor  # [B] bool: the answer ended with a stop token
    logp: torch.Tensor  # [B, T] float: the sampling policy's log-probs of `response` (old log-probs)
    values: torch.Tensor  # [B, T] float: V(s_t) before each response token (old values)
    scores: torch.Tensor  # [B] float: scaled, penalised, clipped reward of each answer (before centring)
    kl: torch.Tensor  # [B] float: the KL estimate to the reference, summed over the answer's tokens
    advantages: torch.Tensor  # [B, T] float: GAE advantages, whitened over the batch's masked tokens
    returns: torch.Tensor  # [B, T] float: advantages + values (before whitening): the value targets
    entropy: torch.Tensor  # scalar: the policy's mean entropy per answer token
    actions: list[str | None]  # [B] each answer's action (None when the answer is not a valid one)
    agree: list[bool]  # [B] the answer's action is the rule teacher's
    teacher_actions: list[str | None]  # [B] the rule teacher's action for each prompt (None: not a chip prompt)
    entropy_decision: float  # mean entropy at the token that picks the action (nan: no answer got there)
    reward_parts: dict[str, float]  # per reward source: its mean raw score (and the judge's counts)
    t_gen: float  # seconds sampling
    t_score: float  # seconds scoring
    t_fwd: float  # seconds of the forwards and shaping that scoring did not overlap
    # With one minibatch, the rollout's policy log-probs and values [B, T], still attached to their
    # autograd graphs: the first PPO step's forwards (its weights and rows are the rollout's). Else None.
    graphs: tuple[torch.Tensor, torch.Tensor] | None = None
    # The output of each model's frozen bottom layers [B, P+T, D] (cache_trunk), else None: the
    # update's forwards run only the layers above it.
    policy_trunk: Trunk | None = None
    value_trunk: Trunk | None = None
    # share_prompts: the batch's groups in the shared-prompt layout (the trunks are in it too), else None
    groups: PromptGroups | None = None

    def take_graphs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The graphs, once: the first step frees them by backpropagating through them."""
        graphs, self.graphs = self.graphs, None
        return graphs

    def rows(self, idx: torch.Tensor) -> Minibatch:
        """The rows `idx`; in the shared-prompt layout they are whole groups, each in order."""
        groups, seqs = None, idx
        if self.groups is not None:
            seqs = idx[::self.groups.size] // self.groups.size
            groups = self.groups.take(seqs)
        return Minibatch(self.ids[idx], self.att[idx], self.response[idx], self.mask[idx], self.logp[idx],
                         self.values[idx], self.advantages[idx], self.returns[idx], self.n_resp,
                         _trunk_rows(self.policy_trunk, seqs), _trunk_rows(self.value_trunk, seqs), groups)


def rows_kept_together(cfg: PPOConfig, world: int) -> int:
    """How many consecutive rows (a prompt's samples) the update's minibatches keep together: the
    group, where micro-batches hold whole groups, else 1 (rows shuffled one by one)."""
    micro = cfg.batch_size // world // cfg.num_mini_batches // cfg.gradient_accumulation_steps
    return cfg.samples_per_prompt if micro % cfg.samples_per_prompt == 0 else 1


def share_prompts(cfg: PPOConfig, model: PolicyAndValue, world: int) -> bool:
    """Whether a prompt's samples run as one sequence: asked for, several samples per prompt kept
    together in the update, lean models."""
    return (cfg.share_prompts and rows_kept_together(cfg, world) > 1
            and supports_lean(model.policy) and supports_lean(model.value))


def _teacher_action(prompt: Prompt) -> str | None:
    spec = spec_from_prompt(prompt[-1]["content"])
    return None if spec is None else rule_action(spec)


def _trunk_rows(trunk: Trunk | None, idx: torch.Tensor) -> Trunk | None:
    return None if trunk is None else (trunk[0], trunk[1][idx])


class Collector:
    """Samples, scores and evaluates a batch of prompts with the current policy and shapes its rewards.

    Shortcuts, all same math, all on where set-up allows and tested against the plain way:
    `reuse_forward` keeps the rollout's policy and value forwards with their graphs for the first
    PPO step (one minibatch, one process); `split_prompt` lets the value model read the prompts on
    the side thread while the policy samples, and the policy keep its prompt state from sampling,
    so the forwards after sampling run only the last prompt token and the response; the trunks
    (cache_trunk, adapters on the top layers only) run each model's frozen bottom layers once over
    the batch, for the policy, the reference and every PPO epoch (it replaces split_prompt there),
    and the bottom layers the policy and the value model hold alike once for both. With
    share_prompts, a prompt's samples run as one sequence (`PromptGroups`) in all of these."""

    def __init__(self, cfg: PPOConfig, acc: Any, model: PolicyAndValue, reference: Reference, tok: Any,
                 stops: list[int], runner: Runner, score: ScoreFn, reward_parts: Callable[[], dict[str, float]],
                 world: int, action_offsets: dict[str, float] | None = None,
                 baselines: Callable[[list[Prompt]], torch.Tensor] | None = None) -> None:
        self.cfg, self.acc, self.model, self.reference, self.tok, self.stops = cfg, acc, model, reference, tok, stops
        self.runner, self.score, self.reward_parts = runner, score, reward_parts
        self.action_offsets = action_offsets or {}  # the reward's lead per action (rlhf.ppo.offsets)
        self.baselines = baselines  # score_baseline canonical: each prompt's baseline (rlhf.ppo.offsets)
        self.device = acc.device
        self._prompt_cache: dict[str, list[int]] = {}
        self._pieces: dict[int, str] = {}
        # With one minibatch the first PPO step runs the rollout's weights on the whole batch: the
        # rollout's policy and value forwards, kept with their graphs, are that step's forwards.
        # (Not with the auxiliary value head: that step reads the policy's hidden states as well.)
        self.reuse_forward = (cfg.num_mini_batches == 1 and cfg.gradient_accumulation_steps == 1 and world == 1
                              and cfg.aux_value_coef == 0)
        # The side thread is idle while the policy samples: the value model reads the prompts then.
        # (The reference and the reward read whole rollouts afterwards, on the two threads; measured on
        # the small bench model, also moving the reference's prompt to the side thread made sampling
        # wait for it: no faster in all.)
        self.split_prompt = runner.parallel and supports_lean(model.policy) and supports_lean(model.value)
        self.policy_depth = frozen_depth(model.policy) if cfg.cache_trunk else 0
        self.value_depth = frozen_depth(model.value) if cfg.cache_trunk else 0
        # the bottom layers both models hold unchanged (the reward model's LoRA sits on top): run once for both
        self.common_depth = shared_depth(model.policy, model.value, min(self.policy_depth, self.value_depth))
        # a prompt's samples run as one sequence in every forward after sampling (micro-batches hold whole groups)
        self.group_size = cfg.samples_per_prompt if share_prompts(cfg, model, world) else 1

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], kl_coef: float) -> Rollout:
        cfg, model, reuse, t0 = self.cfg, self.model, self.reuse_forward, time.perf_counter()
        model.eval()
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        query, query_mask = (t.to(self.device) for t in left_pad(prompt_ids, self.tok.pad_token_id))
        split = self.split_prompt and query.shape[1] > 1 and self.group_size == 1  # the groups' layout replaces it
        value_split, policy_split = split and not self.value_depth, split and not self.policy_depth
        value_state, g = self.runner.run(
            (lambda: self._value_prompt_state(query[:, :-1], query_mask[:, :-1])) if value_split else (lambda: None),
            lambda: self._sample(prompts, prompt_ids, policy_split))
        t_gen = time.perf_counter() - t0
        mask, has_stop = self._response_mask(g.response)
        n_resp = max(1, int(mask.sum(1).max()))  # trim columns no row uses
        response, mask = g.response[:, :n_resp].to(self.device), mask[:, :n_resp].to(self.device)
        ids = torch.cat([query, response], 1)
        att = torch.cat([query_mask, torch.ones_like(response)], 1)
        rest = ids[:, query.shape[1] - 1:]  # the last prompt token and the response: after a prompt state
        groups = group_prompts(ids, att, n_resp, self.group_size) if self.group_size > 1 else None
        t1 = time.perf_counter()
        if reuse:
            model.train()  # as in the update (dropout is off, so the numbers are the same either way)
        with self.acc.autocast():
            common = self._trunk(model.policy, ids, att, self.common_depth, groups)
        trunks: dict[str, Trunk | None] = {"policy": None, "value": None}

        def score_and_values() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
            t_start = time.perf_counter()
            with torch.no_grad():  # grad mode is per thread: this may run on the side thread
                # first: the answers' scoring is what reward_parts reports
                baseline = self.baselines(prompts).to(self.device) if self.baselines is not None else None
                scores = self.score(prompts, g.texts, has_stop)
            t_score = time.perf_counter() - t_start
            with torch.set_grad_enabled(reuse), self.acc.autocast():
                if value_state is not None:
                    return scores, baseline, model.values(rest, att, n_resp, value_state), t_score
                trunks["value"] = self._trunk(model.value, ids, att, self.value_depth, groups, common)
                values = model.values(ids, att, n_resp, trunk=trunks["value"], groups=groups)
                return scores, baseline, values, t_score

        def policy_and_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with self.acc.autocast():
                trunk = trunks["policy"] = self._trunk(model.policy, ids, att, self.policy_depth, groups, common)
                if g.logprobs is not None:  # recorded while sampling: no second pass over the policy
                    logp = g.logprobs[:, :n_resp].to(self.device)
                    entropy = g.entropy[:, :n_resp].to(self.device)
                else:
                    with torch.set_grad_enabled(reuse):
                        if g.prompt_state is not None:
                            logits = model.policy_logits(rest, att, n_resp, g.prompt_state)
                        else:
                            logits = model.policy_logits(ids, att, n_resp, trunk=trunk, groups=groups)
                        logp = core.logprobs_of(logits, response, cfg.temperature)
                    entropy = core.entropy_of(logits.detach(), cfg.temperature)
                    del logits
                return logp, entropy, self.reference.logprobs(model.policy, ids, att, response, n_resp, trunk, groups)

        (scores, baseline, values, t_score), (logp, entropy, ref_logp) = self.runner.run(score_and_values,
                                                                                        policy_and_reference)
        graphs = (logp, values) if reuse else None  # the first PPO step's forwards, with their graphs
        logp, values = logp.detach(), values.detach()
        scores = scores.to(self.device)
        actions, agree, entropy_decision = self._decisions(prompts, g.texts, has_stop, response, mask, entropy)
        kl, advantages, returns = self._shape(scores, actions, logp, ref_logp, values, mask, kl_coef, baseline)
        t_fwd = time.perf_counter() - t1 - t_score  # with the side thread: what scoring did not overlap
        return Rollout(prompts=prompts, texts=g.texts, ids=ids, att=att, response=response, mask=mask,
                       n_resp=n_resp, has_stop=has_stop, logp=logp, values=values, scores=scores, kl=kl.sum(1),
                       advantages=advantages, returns=returns, entropy=core.masked_mean(entropy, mask),
                       actions=actions, agree=agree, entropy_decision=entropy_decision,
                       teacher_actions=[_teacher_action(p) for p in prompts],
                       reward_parts=self.reward_parts(), t_gen=t_gen, t_score=t_score, t_fwd=t_fwd,
                       graphs=graphs, policy_trunk=trunks["policy"], value_trunk=trunks["value"], groups=groups)

    @staticmethod
    def _trunk(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, depth: int,
               groups: PromptGroups | None, start: Trunk | None = None) -> Trunk | None:
        """The output of the model's `depth` frozen layers over the batch (no graph: nothing below
        trains), or None when it has none; from `start` (a shallower trunk of the same weights) on."""
        if not depth:
            return None
        if start is not None and start[0] == depth:
            return start
        with torch.no_grad():
            return trunk_states(model, ids, att, depth, groups, start)

    def _response_mask(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [B, T] long, has_stop [B] bool): up to and including the stop token, or everything
        when there is none (stop_token 'none': fixed length)."""
        if self.stops:
            return core.response_mask(response, self.stops, self.tok.pad_token_id)
        return torch.ones_like(response), torch.ones(len(response), dtype=torch.bool)

    def _shape(self, scores: torch.Tensor, actions: list[str | None], logp: torch.Tensor, ref_logp: torch.Tensor,
               values: torch.Tensor, mask: torch.Tensor, kl_coef: float,
               baseline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 4: per-token KL [B, T], whitened GAE advantages [B, T] and returns [B, T], from rewards
        -kl_coef * KL_t with the centred score on each answer's last token."""
        cfg = self.cfg
        kl = core.kl_per_token(logp, ref_logp, cfg.kl_estimator) * mask
        bonus = core.answer_entropy_bonus(actions, cfg.answer_entropy_coef).to(scores.device)
        # less its baseline (none, batch or the prompt's other samples)
        centred = core.centre_scores(self.learning_scores(scores, actions, bonus), cfg.score_baseline,
                                     cfg.samples_per_prompt, baseline)
        if cfg.centre_actions:  # every per-action constant goes, but the answer-mix bonus comes back
            centred = centred - core.class_means(centred - bonus, actions)
        rewards = core.per_token_rewards(centred, kl, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        return kl, core.masked_whiten(advantages, mask), returns

    def learning_scores(self, scores: torch.Tensor, actions: list[str | None], bonus: torch.Tensor) -> torch.Tensor:
        """What PPO learns from before the baseline: each score [B] less the reward's lead for the
        answer's action (0 without action_offset_chips, or for an invalid answer), plus the
        answer-mix bonus [B] (`core.answer_entropy_bonus`)."""
        shift = torch.tensor([self.action_offsets.get(a, 0.0) for a in actions],  # None: no offset
                             dtype=scores.dtype, device=scores.device)
        return scores - shift + bonus

    def _value_prompt_state(self, ids: torch.Tensor, att: torch.Tensor) -> KeyValues:
        """The value model's keys and values of the prompt but its last token (on the side thread,
        while the policy samples); with their graphs when the first step reuses the forwards."""
        with self.acc.autocast(), torch.set_grad_enabled(self.reuse_forward):
            return key_values(self.model.value, ids, att)

    def _sample(self, prompts: list[Prompt], prompt_ids: list[list[int]], keep_prompt_state: bool) -> Generated:
        cfg = self.cfg
        record = cfg.logprobs_from_generation and not self.reuse_forward  # else the forward runs anyway
        # recording log-probs or keeping the prompt state: in the update's numerics (autocast)
        with self.acc.autocast() if record or keep_prompt_state else nullcontext():
            return generate(self.model.policy, self.tok, prompts, max_new_tokens=cfg.response_length,
                            do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            prompt_ids=prompt_ids, record_logprobs=record, keep_prompt_state=keep_prompt_state,
                            prompt_state_grad=self.reuse_forward,
                            group=cfg.samples_per_prompt if cfg.share_prompts else 1)

    def _decisions(self, prompts: list[Prompt], texts: list[str], has_stop: torch.Tensor, response: torch.Tensor,
                   mask: torch.Tensor, entropy: torch.Tensor) -> tuple[list[str | None], list[bool], float]:
        """What the batch decided: each answer's action (None when invalid), whether it agrees with the
        rule teacher, and the policy's entropy at the token that picks the action (the one choice that
        matters; the mean over all tokens is mostly format, near 0 after SFT)."""
        actions, agree, at_decision = [], [], []
        for row, (prompt, text, stopped) in enumerate(zip(prompts, texts, has_stop)):
            _, agrees, action = judge(prompt[-1]["content"], text, stopped)
            actions.append(action)
            agree.append(agrees)
            n = int(mask[row].sum())
            where = action_token_index([self._piece(t) for t in response[row, :n].tolist()])
            if where is not None:
                at_decision.append(float(entropy[row, where]))
        return actions, agree, float(np.mean(at_decision)) if at_decision else float("nan")

    def _piece(self, token: int) -> str:
        """A token's text, decoded once per id."""
        if token not in self._pieces:
            self._pieces[token] = self.tok.decode([token])
        return self._pieces[token]

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        """A prompt's chat-template token ids, rendered once per prompt (not once per update)."""
        key = json.dumps(prompt, sort_keys=True)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = chat_ids(self.tok, prompt, add_generation_prompt=True)
        return self._prompt_cache[key]
