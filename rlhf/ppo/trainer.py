"""`rlhf ppo`: PPO for a causal LM with a value model, a frozen reference and a per-token KL penalty.

One update, as in the algorithm:
  1. roll out: sample a response for each prompt of the batch; cut at the stop token;
  2. score:    reward sources on prompt + response; penalty when no stop token;
  3. evaluate: old log-probs, reference log-probs, values (no grad);
  4. shape:    r_t = -beta * KL_t, plus the score on the last token; GAE -> advantages, returns;
  5. learn:    num_ppo_epochs x minibatches of clipped policy + clipped value loss.
The math lives in `rlhf.ppo.core`; this file is the loop, checkpoints and logging.
Distributed (torchrun / accelerate launch): each process rolls out batch_size / world_size prompts,
gradients are averaged by DDP; advantages are whitened per process.
"""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhf.chips import ACTIONS, action_token_index
from rlhf.data.schema import PROMPT_COLUMNS, load_rows, resolve_split
from rlhf.errors import UserError
from rlhf.generation import chat_ids, evaluate_policy, generate, judge, left_pad
from rlhf.io import (
    append_jsonl,
    atomic_write_json,
    check_removable,
    mark_owned,
    read_jsonl,
    remove_owned_dir,
    write_metrics,
)
from rlhf.models import (
    add_lora,
    load_causal_lm,
    load_tokenizer,
    load_value_model,
    make_adapter_relocatable,
    stop_token_ids,
)
from rlhf.models.decoder import KeyValues, causal_logits, head_outputs, key_values, supports_lean
from rlhf.ppo import core
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.metrics import CURVES, CollapseWatch
from rlhf.rewards import build_reward
from rlhf.training import quiet_transformers

__all__ = ["PPOConfig", "run"]


class PolicyAndValue(nn.Module):
    """One module for DDP: a forward returns the policy's response logits and per-token values."""

    def __init__(self, policy: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                n_response: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.policy_logits(input_ids, attention_mask, n_response),
                self.values(input_ids, attention_mask, n_response))

    def policy_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
                      past: KeyValues | None = None) -> torch.Tensor:
        """Logits that predict the response tokens. With `past` (the keys and values of the prompt
        but its last token), `input_ids` are the rest: the last prompt token and the response."""
        return causal_logits(self.policy, input_ids, attention_mask, n_response + 1, past)[:, :-1]

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
               past: KeyValues | None = None) -> torch.Tensor:
        """V(s_t) for the states before each response token (`past` as for policy_logits): the value
        model's scalar head at every response position, where a sequence classifier reads only the last."""
        values = head_outputs(self.value, input_ids, attention_mask, n_response + 1, past)
        return values.squeeze(-1).float()[:, :-1]


class SideThread:
    """A second thread for the value model's half of the work (its forward and backward, and the
    scoring), while the policy's half runs on the calling thread: on a CPU these models are too
    small to keep two cores busy with one op at a time, and the two halves share nothing (separate
    graphs, parameters, losses). PyTorch releases the GIL inside ops and runs each backward on the
    thread that calls it. Each thread keeps half the torch threads for the whole run: switching the
    count back and forth costs more than it saves (measured: OpenMP teams re-forming each update
    made the tiny bench 8% slower than no side thread; fixed halves made it 1.36x faster)."""

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.threads, self.half = threads, max(1, threads // 2)
        torch.set_num_threads(self.half)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rlhf-value",
                                       initializer=torch.set_num_threads, initargs=(self.half,))

    def run(self, side: Any, main: Any) -> tuple[Any, Any]:
        """(side(), main()), computed at the same time; an exception in either is raised here."""
        future = self.pool.submit(side)
        try:
            main_result = main()
        finally:
            side_result = future.result()
        return side_result, main_result

    @contextmanager
    def all_threads(self) -> Iterator[None]:
        """Every torch thread for work with nothing beside it (evaluation before and after)."""
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.half)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        torch.set_num_threads(self.threads)


# Measured on 2 cores: the side thread made PPO 1.05-1.3x faster at 0.1-3M parameters and 1.3x slower
# on SmolLM2-135M (26 vs 20 s per update: a 135M model keeps both cores busy alone, and generation
# then runs on half the threads).
SIDE_THREAD_MAX_PARAMS = 50_000_000


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio compares log-probs of the same weights: dropout would make it noise (as in TRL)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


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


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints and tuples only: what torch.load(weights_only=True) reads
    back without unpickling any object (numpy's key array travels as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.random.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def load_checkpoint_file(path: Path, device: Any = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only. A file that needs any
    other object unpickled is refused before anything in it runs (a planted checkpoint in an output
    folder would otherwise execute code on resume)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused, not a checkpoint rlhf wrote (it asks to unpickle "
                        f"{str(err).splitlines()[0][:120]!r}); delete that checkpoint folder or use a new "
                        "--output_dir") from None


class PPOTrainer:
    def __init__(self, cfg: PPOConfig) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        log_with = None if cfg.report_to in ("", "none") else cfg.report_to
        self.acc = Accelerator(log_with=log_with, project_dir=str(self.out),
                               mixed_precision="bf16" if cfg.dtype == "bfloat16" else "no")
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if cfg.batch_size % (self.world * cfg.samples_per_prompt):
            raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by processes x samples_per_prompt "
                            f"({self.world} x {cfg.samples_per_prompt}): a prompt's samples stay in one process")
        if cfg.batch_size % (self.world * cfg.num_mini_batches * cfg.gradient_accumulation_steps):
            raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by processes x num_mini_batches x "
                            f"gradient_accumulation_steps ({self.world} x {cfg.num_mini_batches} x "
                            f"{cfg.gradient_accumulation_steps})")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.device = self.acc.device
        self._load_data()
        self._load_models()
        self.num_updates = cfg.total_episodes // cfg.batch_size
        self._policy_params = [p for p in self.model.policy.parameters() if p.requires_grad]
        self._value_params = [p for p in self.model.value.parameters() if p.requires_grad]
        # One optimizer per model, so each thread steps its own model (the two states are what one
        # optimizer over both would hold: AdamW keeps no state across parameters).
        # eps as in transformers/TRL (1e-8): per-token-mean losses give tiny gradients, and the larger
        # eps common in RL code (1e-5) silently shrinks the steps (measured: no learning in 6k episodes)
        # fused: one kernel for all tensors instead of a Python loop over them (measured on CPU: an
        # optimizer step 1.8 -> 0.3 ms on the 134k-parameter bench model, 28-58 -> 8-12 ms at 3M)
        schedule = (lambda u: 1.0) if cfg.lr_schedule == "constant" else (lambda u: 1.0 - u / self.num_updates)
        optimizers = []
        for params in (self._policy_params, self._value_params):
            fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
            optimizers.append(torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-8, weight_decay=0.0,
                                                fused=fused))
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in optimizers]
        self.model, *self.optimizers = self.acc.prepare(self.model, *optimizers)
        self.kl_ctl = core.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
        self.kl_coef = cfg.kl_coef
        self.start_update = 0
        self.collapse = CollapseWatch(cfg.collapse_share)
        self._value_warmup = False  # set per update by learn(): only the value model steps
        # one process on a CPU, small models: the value model's half of each step on a second thread
        threads = torch.get_num_threads()
        n_params = sum(p.numel() for p in self.inner.policy.parameters())
        use_side = (cfg.parallel_value and self.world == 1 and self.device.type == "cpu" and threads >= 2
                    and n_params < SIDE_THREAD_MAX_PARAMS)
        self.side = SideThread(threads) if use_side else None
        # With one minibatch the first PPO step runs the rollout's weights on the whole batch: the
        # rollout's policy and value forwards, kept with their graphs, are that step's forwards.
        self.reuse_rollout_forward = (cfg.num_mini_batches == 1 and cfg.gradient_accumulation_steps == 1
                                      and self.world == 1)
        # The side thread is idle while the policy samples: the value model reads the prompts then, and
        # the policy keeps its prompt state from sampling; after sampling, both run only the last prompt
        # token and the response. (The reference and the reward read whole rollouts afterwards, on the
        # two threads; measured on the small bench model, also moving the reference's prompt to the side
        # thread made sampling wait for it: no faster in all.)
        self.split_prompt = (self.side is not None and supports_lean(self.inner.policy)
                             and supports_lean(self.inner.value))

    # ---- set-up ---------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        # PPO needs prompts only: a preference folder, or any JSONL with a `prompt` message list.
        train = load_rows(resolve_split(cfg.data, "train"), PROMPT_COLUMNS)
        self.stream = PromptStream([r["prompt"] for r in train], cfg.seed)
        self._prompt_cache: dict[str, list[int]] = {}
        self._pieces: dict[int, str] = {}
        self.eval_prompts: list[Any] = []
        if cfg.eval_prompts > 0:
            test = load_rows(resolve_split(cfg.data, "test"), PROMPT_COLUMNS)
            self.eval_prompts = [r["prompt"] for r in test[: cfg.eval_prompts]]

    def _load_models(self) -> None:
        cfg = self.cfg
        self.tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, padding_side="left")
        self.stops = stop_token_ids(self.tok) if cfg.stop_token == "eos" else []
        policy = load_causal_lm(cfg.model, cfg, merge_lora=True)
        policy.generation_config.eos_token_id = self.stops or None
        self.ref_model: nn.Module | None = None
        if cfg.use_lora:
            policy = add_lora(policy, cfg)  # the reference is this model with its adapters disabled
        else:
            self.ref_model = load_causal_lm(cfg.model, cfg, merge_lora=True).to(self.device).eval()
            self.ref_model.requires_grad_(False)
        value_src = cfg.value_model or cfg.reward_model or cfg.model
        value = load_value_model(value_src, cfg.__class__(dtype=cfg.dtype, use_lora=False),
                                 pad_token_id=self.tok.pad_token_id)
        self._init_value_head(value, value_src)
        if cfg.value_use_lora:
            value = add_lora(value, cfg, task_type="SEQ_CLS")
        disable_dropout(policy)
        disable_dropout(value)
        self.model = PolicyAndValue(policy, value).to(self.device)
        self.reward_fn = build_reward(cfg.rewards, reward_model=cfg.reward_model, device=self.device,
                                      ollama_model=cfg.ollama_model, ollama_host=cfg.ollama_host or None,
                                      cache_dir=str(self.out / "judge-cache"), dtype=cfg.dtype,
                                      normalize=cfg.normalize_reward, score_unfinished=cfg.score_unfinished)
        if cfg.gc_freeze:
            gc.collect()
            gc.freeze()  # the model's many objects never become garbage: stop rescanning them

    def _init_value_head(self, value: nn.Module, value_src: str) -> None:
        """A reward model's head is trained on whole answers only: on prefixes it outputs values of
        +-6 that swamp the advantage of the one token that matters (measured on the tiny model).
        'zero' keeps its backbone features and starts every value at 0; 'reward' keeps the head,
        rescaled like the normalised scores so values and returns share one scale."""
        head = value.score
        with torch.no_grad():
            if self.cfg.value_head_init == "zero":
                head.weight.zero_()
                if getattr(head, "bias", None) is not None:
                    head.bias.zero_()
            elif self.cfg.normalize_reward:
                from rlhf.reward import reward_normalization

                stats = reward_normalization(value_src)
                if stats:
                    head.weight.div_(stats[1])

    @property
    def inner(self) -> PolicyAndValue:
        return self.acc.unwrap_model(self.model)

    # ---- one update -----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[Any]) -> dict[str, Any]:
        cfg, inner = self.cfg, self.inner
        t0 = time.perf_counter()
        inner.eval()
        reuse = self.reuse_rollout_forward  # the policy forward runs anyway: nothing to record
        record = cfg.logprobs_from_generation and not reuse
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        query, query_mask = (t.to(self.device) for t in left_pad(prompt_ids, self.tok.pad_token_id))
        split = self.split_prompt and query.shape[1] > 1
        head = query[:, :-1], query_mask[:, :-1]  # the prompt but its last token

        def value_prompt_state() -> KeyValues:  # on the side thread, while the policy samples
            with self.acc.autocast(), torch.set_grad_enabled(reuse):
                return key_values(inner.value, *head)

        def sample() -> Any:
            # recording log-probs or keeping the prompt state: in the update's numerics (autocast)
            with self.acc.autocast() if record or split else nullcontext():
                return generate(inner.policy, self.tok, prompts, max_new_tokens=cfg.response_length,
                                do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                prompt_ids=prompt_ids, record_logprobs=record, keep_prompt_state=split,
                                prompt_state_grad=reuse)

        if split:
            value_state, g = self.side.run(value_prompt_state, sample)
        else:
            value_state, g = None, sample()
        t_gen = time.perf_counter() - t0
        if self.stops:
            mask, has_stop = core.response_mask(g.response, self.stops, self.tok.pad_token_id)
        else:
            mask, has_stop = torch.ones_like(g.response), torch.ones(len(prompts), dtype=torch.bool)
        n_resp = max(1, int(mask.sum(1).max()))  # trim columns no row uses
        response, mask = g.response[:, :n_resp].to(self.device), mask[:, :n_resp].to(self.device)
        ids = torch.cat([query, response], 1)
        att = torch.cat([query_mask, torch.ones_like(response)], 1)
        rest = ids[:, query.shape[1] - 1:]  # the last prompt token and the response: after a prompt state
        t1 = time.perf_counter()

        if reuse:
            inner.train()  # as in the update (dropout is off, so the numbers are the same either way)

        def score_and_values() -> tuple[torch.Tensor, torch.Tensor, float]:
            with torch.no_grad():  # grad mode is per thread: this may run on the side thread
                scores = self._score(prompts, g.texts, has_stop)
            t_score = time.perf_counter() - t1
            with torch.set_grad_enabled(reuse), self.acc.autocast():
                if value_state is not None:
                    return scores, inner.values(rest, att, n_resp, value_state), t_score
                return scores, inner.values(ids, att, n_resp), t_score

        def policy_and_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with self.acc.autocast():
                if g.logprobs is not None:  # recorded while sampling: no second pass over the policy
                    logp = g.logprobs[:, :n_resp].to(self.device)
                    entropy = g.entropy[:, :n_resp].to(self.device)
                else:
                    with torch.set_grad_enabled(reuse):
                        if g.prompt_state is not None:
                            logits = inner.policy_logits(rest, att, n_resp, g.prompt_state)
                        else:
                            logits = inner.policy_logits(ids, att, n_resp)
                        logp = core.logprobs_of(logits, response, cfg.temperature)
                    entropy = core.entropy_of(logits.detach(), cfg.temperature)
                    del logits
                return logp, entropy, self._ref_logprobs(ids, att, response, n_resp)

        if self.side:
            (scores, values, t_score), (logp, entropy, ref_logp) = self.side.run(score_and_values,
                                                                                policy_and_reference)
        else:
            scores, values, t_score = score_and_values()
            logp, entropy, ref_logp = policy_and_reference()
        graphs = (logp, values) if reuse else None  # the first PPO step's forwards, with their graphs
        logp, values = logp.detach(), values.detach()
        scores = scores.to(self.device)
        decisions = self._decisions(prompts, g.texts, has_stop, response, mask, entropy)
        kl = core.kl_per_token(logp, ref_logp, cfg.kl_estimator) * mask
        bonus = core.answer_entropy_bonus(decisions["actions"], cfg.answer_entropy_coef).to(self.device)
        # the score (plus the answer-mix bonus) less its baseline (none, batch or the prompt's other
        # samples) is what PPO learns from
        centred = core.centre_scores(scores + bonus, cfg.score_baseline, cfg.samples_per_prompt)
        rewards = core.per_token_rewards(centred, kl, mask, self.kl_coef)
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, mask)
        t_fwd = time.perf_counter() - t1 - t_score  # with the side thread: what scoring did not overlap
        return {**decisions, "entropy": core.masked_mean(entropy, mask),
                "ids": ids, "att": att, "response": response, "mask": mask, "n_resp": n_resp,
                "logp": logp, "values": values, "advantages": advantages, "returns": returns, "scores": scores,
                "kl": kl.sum(1), "has_stop": has_stop, "texts": g.texts, "prompts": prompts,
                "t_gen": t_gen, "t_score": t_score, "t_fwd": t_fwd, "graphs": graphs,
                "reward_parts": dict(getattr(self.reward_fn, "last", {}))}

    def _decisions(self, prompts: list[Any], texts: list[str], has_stop: list[bool], response: torch.Tensor,
                   mask: torch.Tensor, entropy: torch.Tensor) -> dict[str, Any]:
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
        return {"actions": actions, "agree": agree,
                "entropy_decision": float(np.mean(at_decision)) if at_decision else float("nan")}

    def _piece(self, token: int) -> str:
        """A token's text, decoded once per id."""
        if token not in self._pieces:
            self._pieces[token] = self.tok.decode([token])
        return self._pieces[token]

    def _prompt_ids(self, prompt: list[dict[str, str]]) -> list[int]:
        """A prompt's chat-template token ids, rendered once per prompt (not once per update)."""
        key = json.dumps(prompt, sort_keys=True)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = chat_ids(self.tok, prompt, add_generation_prompt=True)
        return self._prompt_cache[key]

    def _score(self, prompts: list[Any], texts: list[str], has_stop: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        scores = self.reward_fn(prompts, texts, has_stop.tolist()).float() * cfg.score_scale
        if self.stops:
            scores = scores - cfg.missing_eos_penalty * (~has_stop).float()
        if cfg.score_clip > 0:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return scores

    def _ref_logprobs(self, ids: torch.Tensor, att: torch.Tensor, response: torch.Tensor, n_resp: int) -> torch.Tensor:
        if self.ref_model is not None:
            ctx, ref = nullcontext(), self.ref_model
        else:
            ctx, ref = self.inner.policy.disable_adapter(), self.inner.policy
        with ctx:
            logits = causal_logits(ref, ids, att, n_resp + 1)[:, :-1]
        return core.logprobs_of(logits, response, self.cfg.temperature)

    def learn(self, batch: dict[str, Any], update: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        # critic warm-up: the value model learns per-chip baselines before the policy moves on them
        self._value_warmup = update < cfg.value_warmup_updates
        n = batch["ids"].shape[0]
        mb = n // cfg.num_mini_batches
        micro = mb // cfg.gradient_accumulation_steps
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + update)  # minibatch order: resumable
        graphs = batch.pop("graphs", None)  # the rollout's forwards: the first step's, rows in order
        stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac",
                                                         "grad_norm_policy", "grad_norm_value")}
        for epoch in range(cfg.num_ppo_epochs):
            perm = torch.randperm(n, generator=gen)
            if graphs is not None and epoch == 0:
                perm = torch.arange(n)  # one minibatch: the order only changes the float rounding
            stop_epoch = False
            for start in range(0, n, mb):
                for k in range(start, start + mb, micro):
                    idx = perm[k:k + micro].to(self.device)
                    sync = k + micro >= start + mb
                    new_logp, values = graphs if graphs is not None else (None, None)
                    graphs = None
                    if self.side:  # the same losses and steps, the two models on two threads
                        (vf_loss, vst), (pg_loss, pst) = self.side.run(
                            partial(self._value_step, batch, idx, update, values, sync),
                            partial(self._policy_step, batch, idx, update, new_logp, sync))
                    else:
                        with (nullcontext() if sync or self.world == 1 else self.model.no_sync()):
                            if new_logp is None:
                                logits, values = self.model(batch["ids"][idx], batch["att"][idx], batch["n_resp"])
                                new_logp = self._new_logprobs(batch, idx, logits)
                            pg_loss, pst = self._policy_loss(batch, idx, new_logp)
                            vf_loss, vst = self._value_loss(batch, idx, values)
                            loss = pg_loss + cfg.vf_coef * vf_loss
                            self._check_finite(loss, update)
                            self.acc.backward(loss / cfg.gradient_accumulation_steps)
                        if sync:
                            pst["grad_norm"], vst["grad_norm"] = self._optimizer_step(0), self._optimizer_step(1)
                    for key, val in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clipfrac", pst["clipfrac"]),
                                     ("approx_kl", pst["approx_kl"]), ("vf_clipfrac", vst["vf_clipfrac"])):
                        stats[key].append(float(val.detach()))
                stats["grad_norm_policy"].append(float(pst["grad_norm"]))
                stats["grad_norm_value"].append(float(vst["grad_norm"]))
                if cfg.early_stop_kl > 0:
                    akl = self.acc.reduce(torch.tensor(stats["approx_kl"][-1], device=self.device), "mean")
                    if float(akl) > cfg.early_stop_kl:
                        stop_epoch = True
                        break
            if stop_epoch:
                break
        for scheduler in self.schedulers:
            scheduler.step()
        return {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}

    def _optimizer_step(self, which: int) -> torch.Tensor:
        """Clip one model's gradient and step its optimizer (0: policy, 1: value); returns the norm.
        Each model is clipped on its own: one joint norm lets a large value gradient (early, while the
        values are far off) shrink the policy's step as well."""
        params = (self._policy_params, self._value_params)[which]
        norm = self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if which == 1 or not self._value_warmup:
            self.optimizers[which].step()
        self.optimizers[which].zero_grad(set_to_none=True)
        return norm

    def _new_logprobs(self, batch: dict[str, Any], idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return core.logprobs_of(logits, batch["response"][idx], self.cfg.temperature)

    def _policy_loss(self, batch: dict[str, Any], idx: torch.Tensor,
                     new_logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return core.policy_loss(new_logp, batch["logp"][idx], batch["advantages"][idx], batch["mask"][idx],
                                self.cfg.cliprange)

    def _value_loss(self, batch: dict[str, Any], idx: torch.Tensor,
                    values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return core.value_loss(values, batch["values"][idx], batch["returns"][idx], batch["mask"][idx],
                               self.cfg.cliprange_value)

    @staticmethod
    def _check_finite(loss: torch.Tensor, update: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at update {update}")

    def _policy_step(self, batch: dict[str, Any], idx: torch.Tensor, update: int,
                     new_logp: torch.Tensor | None = None, step: bool = False) -> tuple[torch.Tensor, Any]:
        """Forward (unless given) and backward of the policy's loss alone (the side thread does the
        value's), then its optimizer step if `step` (the minibatch's last micro-batch)."""
        if new_logp is None:
            with self.acc.autocast():
                logits = self.inner.policy_logits(batch["ids"][idx], batch["att"][idx], batch["n_resp"])
            new_logp = self._new_logprobs(batch, idx, logits)
        pg_loss, pst = self._policy_loss(batch, idx, new_logp)
        self._check_finite(pg_loss, update)
        self.acc.backward(pg_loss / self.cfg.gradient_accumulation_steps)
        if step:
            pst["grad_norm"] = self._optimizer_step(0)
        return pg_loss, pst

    def _value_step(self, batch: dict[str, Any], idx: torch.Tensor, update: int,
                    values: torch.Tensor | None = None, step: bool = False) -> tuple[torch.Tensor, Any]:
        if values is None:
            with self.acc.autocast():
                values = self.inner.values(batch["ids"][idx], batch["att"][idx], batch["n_resp"])
        vf_loss, vst = self._value_loss(batch, idx, values)
        self._check_finite(vf_loss, update)
        self.acc.backward(self.cfg.vf_coef * vf_loss / self.cfg.gradient_accumulation_steps)
        if step:
            vst["grad_norm"] = self._optimizer_step(1)
        return vf_loss, vst

    # ---- checkpoints ----------------------------------------------------------------------------
    def _checkpoint_dirs(self) -> list[Path]:
        root = self.out / "checkpoints"
        return sorted(p for p in root.glob("update-*") if (p / "state.json").is_file()) if root.is_dir() else []

    def save_checkpoint(self, update: int) -> None:
        """Everything needed to continue exactly: weights/adapters, optimizer, scheduler, RNG, position."""
        self.acc.wait_for_everyone()
        root = self.out / "checkpoints"
        final = root / f"update-{update:06d}"
        tmp = root / f".tmp-update-{update:06d}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"model": {k: v for k, v in self.inner.state_dict().items() if self._is_trainable(k)},
                        "optimizers": [opt.state_dict() for opt in self.optimizers],
                        "schedulers": [sch.state_dict() for sch in self.schedulers]},
                       tmp / "trainer.pt")
        self.acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            atomic_write_json(tmp / "state.json", {"update": update, "kl_coef": self.kl_coef, "world_size": self.world,
                                                   "settings": self.cfg.training_settings()})
            os.replace(tmp, final)  # a checkpoint exists whole or not at all
            for old in self._checkpoint_dirs()[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _is_trainable(self, key: str) -> bool:
        """Checkpoints hold what training changes; frozen base weights are reloaded from the model."""
        if not hasattr(self, "_trainable_keys"):
            self._trainable_keys = {n for n, p in self.inner.named_parameters() if p.requires_grad}
        return key in self._trainable_keys

    def maybe_resume(self) -> None:
        ckpts = self._checkpoint_dirs()
        if not (self.cfg.resume and ckpts) or self.cfg.overwrite:
            self._start_fresh()
            return
        ck = ckpts[-1]
        state = json.loads((ck / "state.json").read_text())
        if state.get("world_size", 1) != self.world:
            raise UserError(f"{ck}: written by {state.get('world_size')} processes, resumed with {self.world}; "
                            "resume with the same number or start a new --output_dir")
        self._check_same_settings(ck, state.get("settings"))
        blob = load_checkpoint_file(ck / "trainer.pt", self.device)
        missing = self.inner.load_state_dict(blob["model"], strict=False)
        if missing.unexpected_keys:
            raise UserError(f"{ck}: checkpoint does not match this model ({missing.unexpected_keys[0]}); "
                            "use a new --output_dir or the config it was written with")
        if "optimizers" not in blob:
            raise UserError(f"{ck}: written by an older rlhf (one optimizer for both models); "
                            "start a new --output_dir")
        for opt, sd in zip(self.optimizers, blob["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for sch, sd in zip(self.schedulers, blob["schedulers"], strict=True):
            sch.load_state_dict(sd)
        _set_rng_state(load_checkpoint_file(ck / f"rng-{self.rank}.pt"))
        self.kl_coef = state["kl_coef"]
        if self.kl_ctl:
            self.kl_ctl.value = self.kl_coef
        self.start_update = state["update"]
        log = self.out / "metrics.jsonl"
        if self.acc.is_main_process and log.exists():  # drop rows logged after the checkpoint
            rows = [r for r in read_jsonl(log, tolerate_torn_tail=True) if r.get("update", 0) <= self.start_update]
            tmp = log.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, log)
        print(f"resuming from {ck} (update {self.start_update} of {self.num_updates})", flush=True)

    def _check_same_settings(self, ck: Path, saved: dict[str, Any] | None) -> None:
        """A resume continues the checkpoint's training, so its settings must be this run's: a new
        learning rate, KL coefficient, seed or batch would silently mix two trainings."""
        fresh = "--resume false (or --overwrite true) to start over in this folder, or use a new --output_dir"
        if saved is None:
            raise UserError(f"{ck}: the checkpoint does not record its settings, so resuming could mix two "
                            f"trainings; pass {fresh}")
        now = json.loads(json.dumps(self.cfg.training_settings()))  # as state.json holds them
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise UserError(f"{ck}: this run's settings differ from the checkpoint's ({shown}{more}); rerun with "
                            f"the checkpoint's values to resume, or pass {fresh}")

    def _start_fresh(self) -> None:
        """A run that does not resume starts its own metrics.jsonl and checkpoints: an earlier run's
        rows would be read as this one's, and its checkpoints block this run's of the same number."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            for old in self._checkpoint_dirs():  # update-N folders with a state.json: only rlhf writes those
                shutil.rmtree(old)
        self.acc.wait_for_everyone()

    # ---- evaluation and outputs -----------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        if not self.eval_prompts:
            return {}
        with self.side.all_threads() if self.side else nullcontext():  # nothing runs beside it
            return self._evaluate()

    def _evaluate(self) -> dict[str, Any]:
        cfg, policy = self.cfg, self.inner.policy
        out: dict[str, Any] = {}
        for mode, sample in (("greedy", False), ("sampled", True)):
            r = evaluate_policy(policy, self.tok, self.eval_prompts, do_sample=sample, temperature=cfg.temperature,
                                max_new_tokens=cfg.response_length, seed=cfg.seed + 12345)
            out[f"agreement_{mode}"] = r["agreement"]
            out[f"json_valid_{mode}"] = r["json_valid"]
            out[f"mean_length_{mode}"] = r["mean_length"]
            out[f"action_share_{mode}"] = r["action_share"]
            if mode == "greedy":
                out["samples"] = r["samples"]
        # mean reward of sampled answers on held-out prompts (same sources as training)
        state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed + 999)
        g = generate(policy, self.tok, self.eval_prompts, max_new_tokens=cfg.response_length, do_sample=True,
                     temperature=cfg.temperature)
        out["reward_mean"] = float(self.reward_fn(self.eval_prompts, g.texts, g.has_stop).mean())
        torch.random.set_rng_state(state)
        return out

    def save_outputs(self) -> None:
        if not self.acc.is_main_process:
            return
        for name, model in (("policy", self.inner.policy), ("value", self.inner.value)):
            target, tmp = self.out / name, self.out / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)  # our own scratch name, from a run killed while saving
            model.save_pretrained(tmp)
            if name == "policy":
                self.tok.save_pretrained(tmp)
            mark_owned(tmp)
            remove_owned_dir(target, force=self.cfg.overwrite)
            os.replace(tmp, target)  # the folder exists whole or not at all
            make_adapter_relocatable(target)

    def check_output_folders(self) -> None:
        """Before training: policy/ and value/ will be replaced, so they must be rlhf's (or absent)."""
        for name in ("policy", "value"):
            check_removable(self.out / name, force=self.cfg.overwrite)

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        wall0 = time.time()
        self.check_output_folders()
        self.maybe_resume()
        before = self._before_metrics()
        if self.acc.is_main_process:
            scalars = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
            self.acc.init_trackers("ppo", config=scalars)
        bar = tqdm(range(self.start_update, self.num_updates), desc="ppo", disable=not self.acc.is_main_process,
                   initial=self.start_update, total=self.num_updates)
        t_train = 0.0
        episodes = tokens = 0
        timing = {"generate": 0.0, "score": 0.0, "forward": 0.0, "update": 0.0}
        last: dict[str, Any] = {}
        for update in bar:
            t0 = time.perf_counter()
            prompts = self.stream.batch(update, cfg.batch_size, self.rank, self.world, cfg.samples_per_prompt)
            batch = self.rollout(prompts)
            if not torch.isfinite(batch["scores"]).all():
                raise FloatingPointError(f"non-finite reward at update {update + 1}")
            t1 = time.perf_counter()
            stats = self.learn(batch, update)
            dt = time.perf_counter() - t0
            t_train += dt
            n_local = len(prompts)
            episodes += n_local * self.world
            tokens += int(batch["mask"].sum()) * self.world
            for k, v in (("generate", batch["t_gen"]), ("score", batch["t_score"]), ("forward", batch["t_fwd"]),
                         ("update", time.perf_counter() - t1)):
                timing[k] += v
            row = self._update_metrics(update + 1, batch, stats, episodes / t_train, tokens / t_train)
            warning = self.collapse.check(row)
            if warning and self.acc.is_main_process:
                tqdm.write(warning)
            if self.kl_ctl:
                self.kl_coef = self.kl_ctl.update(row["kl"], cfg.batch_size)
            last = row
            if self.acc.is_main_process:
                if (update + 1) % cfg.log_every == 0 or update + 1 == self.num_updates:
                    append_jsonl(self.out / "metrics.jsonl", [row])
                    self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=update + 1)
                bar.set_postfix(score=f"{row['score_mean']:.2f}", kl=f"{row['kl']:.2f}", ent=f"{row['entropy']:.2f}")
                if cfg.sample_every and (update + 1) % cfg.sample_every == 0:
                    tqdm.write(f"[update {update + 1}] {batch['texts'][0]!r} -> score {float(batch['scores'][0]):.2f}")
            if cfg.save_every and (update + 1) % cfg.save_every == 0 and update + 1 < self.num_updates:
                self.save_checkpoint(update + 1)
        bar.close()
        if self.num_updates > self.start_update:
            self.save_checkpoint(self.num_updates)
        after = self.evaluate() if self.acc.is_main_process else {}
        self.save_outputs()
        metrics = self._final_metrics(before, after, last, timing, t_train, episodes, tokens, time.time() - wall0)
        if self.acc.is_main_process:
            write_metrics(self.out, metrics)
        self.acc.wait_for_everyone()
        self.acc.end_training()  # closes trackers and the process group: nothing collective after it
        return metrics

    def _before_metrics(self) -> dict[str, Any]:
        """Evaluation of the starting policy, computed once and kept across resumes."""
        path = self.out / "before.json"
        if not self.acc.is_main_process:
            return {}
        if path.is_file():
            return json.loads(path.read_text())
        before = self.evaluate()
        atomic_write_json(path, before)
        return before

    def _update_metrics(self, update: int, b: dict[str, Any], stats: dict[str, float], eps: float,
                        tps: float) -> dict[str, Any]:
        mask = b["mask"]
        local = {
            "score_mean": float(b["scores"].mean()),
            "score_std": float(b["scores"].std()) if len(b["scores"]) > 1 else 0.0,
            "kl": float(b["kl"].mean()), "entropy": float(b["entropy"]),
            "response_length": float(mask.sum(1).float().mean()),
            "no_stop_fraction": float((~b["has_stop"]).float().mean()),
            "explained_variance": core.explained_variance(b["values"], b["returns"], mask),
            "entropy_decision": b["entropy_decision"],
            "agreement_batch": float(np.mean(b["agree"])),
            **{f"action_share_{a}": float(np.mean([x == a for x in b["actions"]])) for a in ACTIONS},
            **stats,
        }
        t = torch.tensor(list(local.values()), device=self.device, dtype=torch.float64)
        t = self.acc.reduce(t, "mean") if self.world > 1 else t
        row: dict[str, Any] = {"update": update, **dict(zip(local, t.tolist()))}
        row.update({"kl_coef": self.kl_coef, "lr": self.schedulers[0].get_last_lr()[0], "episodes_per_second": eps,
                    "tokens_per_second": tps,
                    **{f"reward_{k}": v for k, v in b["reward_parts"].items()}})
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v) and k in ("score_mean", "kl"):
                raise FloatingPointError(f"non-finite {k} at update {update}")
        if not math.isfinite(row["entropy_decision"]):
            row["entropy_decision"] = None  # no answer in the batch reached an action
        return row

    def _final_metrics(self, before: dict[str, Any], after: dict[str, Any], last: dict[str, Any],
                       timing: dict[str, float], t_train: float, episodes: int, tokens: int,
                       wall: float) -> dict[str, Any]:
        rows = logged_rows(self.out)
        final = (rows or [last])[-1]
        m: dict[str, Any] = {
            "agreement_before": before.get("agreement_greedy"), "agreement_after": after.get("agreement_greedy"),
            "agreement_sampled_before": before.get("agreement_sampled"),
            "agreement_sampled_after": after.get("agreement_sampled"),
            "json_valid_before": before.get("json_valid_greedy"), "json_valid_after": after.get("json_valid_greedy"),
            "reward_before": before.get("reward_mean"), "reward_after": after.get("reward_mean"),
            "kl_final": final.get("kl"), "score_final": final.get("score_mean"),
            "updates": self.num_updates, "episodes": self.num_updates * self.cfg.batch_size,
            "episodes_per_second": (episodes / t_train) if t_train else None,
            "tokens_per_second": (tokens / t_train) if t_train else None,
            "train_seconds_this_run": round(t_train, 2),
            "time_split_seconds": {k: round(v, 2) for k, v in timing.items()},
            "wall_seconds": round(wall, 2), "world_size": self.world, "resumed_from_update": self.start_update,
            "value_on_side_thread": self.side is not None,
            "samples_before": before.get("samples", []), "samples_after": after.get("samples", []),
            "action_share_after": after.get("action_share_greedy"),
            "action_share_sampled_after": after.get("action_share_sampled"),
            "collapse_warning": self.collapse.first,
        }
        judged = [r for r in rows if "reward_ollama_calls" in r]
        if judged:  # the Ollama judge's failures (each scored a neutral 0.5), over the logged updates
            m["judge_failures"] = sum(r["reward_ollama_failures"] for r in judged)
            m["judge_calls"] = sum(r["reward_ollama_calls"] for r in judged)
        return m


def logged_rows(out: Path) -> list[dict[str, Any]]:
    """The per-update rows of metrics.jsonl in `out` (a torn last line from a kill is dropped)."""
    log = out / "metrics.jsonl"
    return read_jsonl(log, tolerate_torn_tail=True) if log.exists() else []


def plot_ppo_curves(out: Path) -> None:
    """ppo_curves.png from metrics.jsonl in `out`."""
    from rlhf.plots import plot_curves

    rows = logged_rows(out)
    if rows:
        plot_curves(rows, CURVES,
                    out / "ppo_curves.png", title="PPO")


def run(cfg: PPOConfig) -> dict[str, Any]:
    quiet_transformers()
    trainer = PPOTrainer(cfg)
    out, is_main = trainer.out, trainer.acc.is_main_process
    try:
        metrics = trainer.train()
    except FloatingPointError as e:
        ck = trainer._checkpoint_dirs()
        where = f"; the last good checkpoint is {ck[-1]}" if ck else ""
        raise UserError(f"PPO stopped: {e}{where}. Lower --learning_rate or raise --kl_coef, then rerun "
                        "(it resumes from the checkpoint)") from None
    finally:
        if trainer.side:  # hand the torch threads back (the pipeline runs the next stage in this process)
            trainer.side.close()
        del trainer
        gc.unfreeze()  # the trainer froze its models' objects for speed: let them be collected now
        gc.collect()
    if is_main:
        plot_ppo_curves(out)  # after the models are freed, so plotting adds nothing to the training's peak memory
        agreement = (f"agreement {metrics['agreement_before']:.3f} -> {metrics['agreement_after']:.3f}"
                     if metrics["agreement_after"] is not None else "agreement not evaluated (eval_prompts 0)")
        # a rerun of a finished run trains nothing: no KL or speed of its own to print
        speed = (f"KL {metrics['kl_final']:.2f}, {metrics['episodes_per_second']:.1f} episodes/s, "
                 if metrics["episodes_per_second"] is not None else "no updates left, ")
        print(f"PPO done: {agreement}, {speed}world size {metrics['world_size']} -> {cfg.output_dir}")
    return metrics
