"""`rlhf ppo`: PPO for a causal LM with a value model, a frozen reference and a per-token KL penalty.

One update, as in the algorithm:
  1. roll out: sample a response for each prompt of the batch; cut at the stop token;
  2. score:    reward sources on prompt + response; penalty when no stop token;
  3. evaluate: old log-probs, reference log-probs, values (no grad);
  4. shape:    r_t = -beta * KL_t, plus the score on the last token; GAE -> advantages, returns;
  5. learn:    num_ppo_epochs x minibatches of clipped policy + clipped value loss.
Steps 1-4 are `rollout`, the math `core`, the models `models`, the folders `checkpoint`, the rows of
metrics.jsonl `metrics`, the value model's second thread `parallel`; this file is the loop.
Distributed (torchrun / accelerate launch): each process rolls out batch_size / world_size prompts,
gradients are averaged by DDP; advantages are whitened per process.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.data.schema import PROMPT_COLUMNS, load_rows, resolve_split
from rlhf.errors import UserError
from rlhf.generation import evaluate_model
from rlhf.io import append_jsonl, atomic_write_json, write_metrics
from rlhf.models.precision import resolve_dtype
from rlhf.ppo import core
from rlhf.ppo.checkpoint import Checkpoints, check_output_folders, save_outputs
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.metrics import CollapseWatch, check_row, final_metrics, logged_rows, plot_ppo_curves, rollout_stats
from rlhf.ppo.models import PolicyAndValue, load_models
from rlhf.ppo.offsets import CanonicalBaselines, check_canonical_prompts, probe_action_offsets
from rlhf.ppo.parallel import make_runner
from rlhf.ppo.rollout import Collector, Minibatch, Prompt, PromptStream, Rollout, rows_kept_together
from rlhf.ppo.undo import StepUndo
from rlhf.rewards import build_reward
from rlhf.training import quiet_transformers

__all__ = ["PPOConfig", "run"]

LOSS_STATS = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac")  # one value per micro-batch
# one value per minibatch (optimizer step); max_log_ratio: the largest single-token move before the
# step; policy_steps: 1 where the policy stepped
STEP_STATS = ("grad_norm_policy", "grad_norm_value", "max_log_ratio", "policy_steps")


class PPOTrainer:
    def __init__(self, cfg: PPOConfig) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        log_with = None if cfg.report_to in ("", "none") else cfg.report_to
        self.acc = Accelerator(log_with=log_with, project_dir=str(self.out),
                               mixed_precision="bf16" if resolve_dtype(cfg.dtype) == "bfloat16" else "no")
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        _check_batch(cfg, self.world)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.device = self.acc.device
        # PPO needs prompts only: a preference folder, or any JSONL with a `prompt` message list.
        train = load_rows(resolve_split(cfg.data, "train"), PROMPT_COLUMNS)
        self.stream = PromptStream([r["prompt"] for r in train], cfg.seed)
        test = load_rows(resolve_split(cfg.data, "test"), PROMPT_COLUMNS) if cfg.eval_prompts > 0 else []
        self.eval_prompts: list[Prompt] = [r["prompt"] for r in test[: cfg.eval_prompts]]
        models = load_models(cfg, self.device)
        self.tok, self.stops, self.model, self.reference = models.tok, models.stops, models.model, models.reference
        self.reward_fn = build_reward(cfg.rewards, reward_model=cfg.reward_model, device=self.device,
                                      ollama_model=cfg.ollama_model, ollama_host=cfg.ollama_host or None,
                                      cache_dir=str(self.out / "judge-cache"), dtype=cfg.dtype,
                                      normalize=cfg.normalize_reward, score_unfinished=cfg.score_unfinished)
        if cfg.gc_freeze:
            gc.collect()
            gc.freeze()  # the model's many objects never become garbage: stop rescanning them
        self.num_updates = cfg.total_episodes // cfg.batch_size
        self.group = rows_kept_together(cfg, self.world)  # a prompt's samples share each minibatch
        # the auxiliary value head steps with the policy: its loss is part of the policy's
        aux_head = [] if self.model.aux_value is None else list(self.model.aux_value.parameters())
        self._policy_params = [p for p in self.model.policy.parameters() if p.requires_grad] + aux_head
        self._value_params = [p for p in self.model.value.parameters() if p.requires_grad]
        optimizers = [_adamw(params, cfg.learning_rate) for params in (self._policy_params, self._value_params)]
        schedule = (lambda u: 1.0) if cfg.lr_schedule == "constant" else (lambda u: 1.0 - u / self.num_updates)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in optimizers]
        self.model, *self.optimizers = self.acc.prepare(self.model, *optimizers)
        self.inner: PolicyAndValue = self.acc.unwrap_model(self.model)  # without its DDP wrapper; 0.14 ms a call
        self._steppers = _steppers(self.acc, self.optimizers)
        self._undo = StepUndo(self._policy_params, self._steppers[0][1]) if cfg.undo_step_past_bound else None
        self.kl_ctl = core.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
        self.kl_coef = cfg.kl_coef
        self.start_update = 0
        self.collapse = CollapseWatch(cfg.collapse_share)
        self.checkpoints = Checkpoints(self.acc, self.out, cfg)
        n_params = sum(p.numel() for p in self.inner.policy.parameters())
        self.runner = make_runner(cfg.parallel_value, self.world, self.device, n_params)
        self.action_offsets: dict[str, float] = {}
        if cfg.action_offset_chips:  # the reward's lead per action, out of every score PPO learns from
            self.action_offsets = probe_action_offsets(self._score, self.stream.prompts, cfg.action_offset_chips)
        self.canonical: CanonicalBaselines | None = None
        if cfg.score_baseline == "canonical":  # each chip's mean score over the canonical answers
            check_canonical_prompts(self.stream.prompts)
            self.canonical = CanonicalBaselines(self._score)
        self.collect = Collector(cfg, self.acc, self.inner, self.reference, self.tok, self.stops, self.runner,
                                 self._score, self._reward_parts, self.world, self.action_offsets, self.canonical)

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        wall0 = time.time()
        check_output_folders(self.out, cfg.overwrite)  # before training: they will be replaced
        self.maybe_resume()
        before = self._before_metrics()
        if self.acc.is_main_process:
            scalars = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
            self.acc.init_trackers("ppo", config=scalars)
        if self.action_offsets and self.acc.is_main_process:
            tqdm.write("the reward's lead per action, taken out of each answer's score: "
                       + ", ".join(f"{a} {v:+.2f}" for a, v in self.action_offsets.items()))
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
            if not torch.isfinite(batch.scores).all():
                raise FloatingPointError(f"non-finite reward at update {update + 1}")
            t1 = time.perf_counter()
            stats = self.learn(batch, update)
            t_train += time.perf_counter() - t0
            episodes += len(prompts) * self.world
            tokens += int(batch.mask.sum()) * self.world
            for k, v in (("generate", batch.t_gen), ("score", batch.t_score), ("forward", batch.t_fwd),
                         ("update", time.perf_counter() - t1)):
                timing[k] += v
            last = self._update_row(update + 1, batch, stats, episodes / t_train, tokens / t_train)
            self._after_update(update + 1, last, batch, bar)
        bar.close()
        if self.num_updates > self.start_update:  # the last update's checkpoint: a rerun trains nothing
            self.save_checkpoint(self.num_updates)
        after = self.evaluate() if self.acc.is_main_process else {}
        if self.acc.is_main_process:
            save_outputs(self.out, self.inner, self.tok, self.cfg.overwrite)
        run_numbers = {
            "updates": self.num_updates, "episodes": self.num_updates * cfg.batch_size,
            "episodes_per_second": (episodes / t_train) if t_train else None,
            "tokens_per_second": (tokens / t_train) if t_train else None,
            "train_seconds_this_run": round(t_train, 2),
            "time_split_seconds": {k: round(v, 2) for k, v in timing.items()},
            "wall_seconds": round(time.time() - wall0, 2), "world_size": self.world,
            "resumed_from_update": self.start_update, "value_on_side_thread": self.runner.parallel,
            "action_offsets": self.action_offsets or None,
        }
        metrics = final_metrics(logged_rows(self.out), last, before, after, run_numbers, self.collapse.first)
        if self.acc.is_main_process:
            write_metrics(self.out, metrics)
        self.acc.wait_for_everyone()
        self.acc.end_training()  # closes trackers and the process group: nothing collective after it
        return metrics

    def _after_update(self, update: int, row: dict[str, Any], batch: Rollout, bar: Any) -> None:
        """Watch for a collapse, adapt the KL coefficient, log the row, show a sample, checkpoint."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.acc.is_main_process
        warning = self.collapse.check(row)
        if warning and main:
            tqdm.write(warning)
        if self.kl_ctl:  # the adaptive controller moves beta toward target_kl
            self.kl_coef = self.kl_ctl.update(row["kl"], cfg.batch_size)
        if main:
            if update % cfg.log_every == 0 or update == self.num_updates:
                append_jsonl(self.out / "metrics.jsonl", [row])
                self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=update)
            bar.set_postfix(score=f"{row['score_mean']:.2f}", kl=f"{row['kl']:.2f}", ent=f"{row['entropy']:.2f}")
            if cfg.sample_every and update % cfg.sample_every == 0:
                tqdm.write(f"[update {update}] {batch.texts[0]!r} -> score {float(batch.scores[0]):.2f}")
        if cfg.save_every and update % cfg.save_every == 0 and update < self.num_updates:
            self.save_checkpoint(update)

    def rollout(self, prompts: list[Prompt]) -> Rollout:
        """Steps 1-4: sample, score, evaluate, shape (at this update's KL coefficient)."""
        return self.collect(prompts, self.kl_coef)

    def learn(self, batch: Rollout, update: int) -> dict[str, float]:
        """Step 5: num_ppo_epochs passes over the batch in shuffled minibatches, each one optimizer
        step per model over its gradient_accumulation_steps micro-batches; the means of the stats
        (max_log_ratio: the largest; policy_steps: how many the policy took and kept, fewer once a
        token moved past early_stop_log_ratio, and with undo_step_past_bound less the undone one)."""
        cfg = self.cfg
        self.model.train()
        # critic warm-up: the value model learns per-chip baselines before the policy moves on them
        policy_steps = update >= cfg.value_warmup_updates
        n = batch.ids.shape[0]
        mb = n // cfg.num_mini_batches
        micro = mb // cfg.gradient_accumulation_steps
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + update)  # minibatch order: resumable
        graphs = batch.take_graphs()  # the rollout's forwards: the first step's, rows in order
        stats: dict[str, list[float]] = {k: [] for k in (*LOSS_STATS, *STEP_STATS)}
        undo = self._undo  # None unless undo_step_past_bound: then it holds the state before the last step
        undone = 0
        for epoch in range(cfg.num_ppo_epochs):
            perm = _shuffled_rows(n, self.group, gen)
            if graphs is not None and epoch == 0:
                perm = torch.arange(n)  # one minibatch: the order only changes the float rounding
            stop_epoch = False
            for start in range(0, n, mb):
                moved = 0.0  # the minibatch's largest single-token |log ratio| before this step
                for k in range(start, start + mb, micro):
                    rows = batch.rows(perm[k:k + micro].to(self.device))
                    last_micro = k + micro >= start + mb  # DDP averages the gradients once per minibatch
                    (vf_loss, vst), (pg_loss, pst) = self._backward(rows, graphs, update, last_micro)
                    graphs = None
                    for key, val in zip(LOSS_STATS, (pg_loss, vf_loss, pst["clipfrac"], pst["approx_kl"],
                                                     vst["vf_clipfrac"]), strict=True):
                        stats[key].append(float(val.detach()))
                    moved = max(moved, float(pst["max_log_ratio"]))
                    if "aux_value_loss" in pst:  # logged only where there is the head
                        stats.setdefault("aux_value_loss", []).append(float(pst["aux_value_loss"]))
                stats["max_log_ratio"].append(moved)
                if policy_steps and 0 < cfg.early_stop_log_ratio < self._largest(moved):
                    policy_steps = False  # this step's gradient is dropped too: it would push that token further
                    if undo is not None and undo.saved:  # and the step that carried it past is undone
                        undo.restore()
                        undone += 1
                if undo is not None and policy_steps:
                    undo.save()
                # each model steps on its own thread where the runner has two
                norm_value, norm_policy = self.runner.run(partial(self._optimizer_step, 1),
                                                          partial(self._optimizer_step, 0, policy_steps))
                stats["grad_norm_policy"].append(float(norm_policy))
                stats["grad_norm_value"].append(float(norm_value))
                stats["policy_steps"].append(float(policy_steps))
                if cfg.early_stop_kl > 0:  # the policy moved far from the rollout's: stop the update's epochs
                    akl = self.acc.reduce(torch.tensor(stats["approx_kl"][-1], device=self.device), "mean")
                    if float(akl) > cfg.early_stop_kl:
                        stop_epoch = True
                        break
            if stop_epoch:
                break
        if undo is not None and undo.saved:  # the last step: no epoch's forward has seen it
            moved = self._largest(self._largest_move(batch, micro))
            stats["max_log_ratio"].append(moved)
            if moved > cfg.early_stop_log_ratio:
                undo.restore()
                undone += 1
            undo.clear()
        for scheduler in self.schedulers:
            scheduler.step()
        out = {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}
        out["max_log_ratio"] = max(stats["max_log_ratio"])  # the update's largest, not a mean of maxima
        out["policy_steps"] = sum(stats["policy_steps"]) - undone  # of num_ppo_epochs x num_mini_batches
        return out

    def _policy_logprobs(self, mb: Minibatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward of the policy on `mb`: its response tokens' log-probs, and the auxiliary
        value head's V(s_t) (None without the head)."""
        with self.acc.autocast():
            logits, aux = self.inner.policy_outputs(mb.ids, mb.att, mb.n_resp, trunk=mb.policy_trunk,
                                                    groups=mb.groups)
        return core.logprobs_of(logits, mb.response, self.cfg.temperature), aux

    @torch.no_grad()
    def _largest_move(self, batch: Rollout, micro: int) -> float:
        """The largest single-token |log pi/pi_old| over this process's batch, in micro-batches of
        `micro` rows, one forward of the policy."""
        moved = 0.0
        for k in range(0, batch.ids.shape[0], micro):
            mb = batch.rows(torch.arange(k, k + micro, device=self.device))
            logp, _ = self._policy_logprobs(mb)
            moved = max(moved, float(core.max_log_ratio(logp, mb.logp, mb.mask, self.cfg.early_stop_min_prob)))
        return moved

    def _largest(self, value: float) -> float:
        """The largest of `value` over the processes, so all of them stop stepping together."""
        if self.world == 1:
            return value
        return float(self.acc.gather(torch.tensor([value], device=self.device)).max())

    def _backward(self, mb: Minibatch, graphs: tuple[torch.Tensor, torch.Tensor] | None, update: int,
                  sync: bool) -> tuple[tuple[torch.Tensor, dict[str, torch.Tensor]], ...]:
        """Both models' losses on one micro-batch, backpropagated, the value model's half beside the
        policy's where the runner has two threads. `graphs`: the forwards already run (log-probs,
        values); else each half runs its own, or, with several processes, one forward runs both."""
        with self.acc.no_sync(self.model) if not sync else nullcontext():
            aux = None
            if graphs is None and self.world > 1:  # DDP averages gradients only through its own forward
                logits, values, aux = self.model(mb.ids, mb.att, mb.n_resp, mb.policy_trunk, mb.value_trunk,
                                                 mb.groups)
                graphs = core.logprobs_of(logits, mb.response, self.cfg.temperature), values
            new_logp, values = graphs if graphs is not None else (None, None)
            return self.runner.run(partial(self._value_half, mb, values, update),
                                   partial(self._policy_half, mb, new_logp, aux, update))

    def _policy_half(self, mb: Minibatch, new_logp: torch.Tensor | None, aux: torch.Tensor | None,
                     update: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped policy loss (after the policy's forward unless `new_logp` is given), plus the
        auxiliary value head's loss at aux_value_coef where there is the head, backpropagated."""
        cfg = self.cfg
        if new_logp is None:
            new_logp, aux = self._policy_logprobs(mb)
        pg_loss, pst = core.policy_loss(new_logp, mb.logp, mb.advantages, mb.mask, cfg.cliprange,
                                        cfg.early_stop_min_prob)
        loss = pg_loss
        if aux is not None:  # the policy's layers learn to predict the returns too (PPG)
            aux_loss = core.aux_value_loss(aux, mb.returns, mb.mask)
            pst["aux_value_loss"] = aux_loss.detach()
            loss = pg_loss + cfg.aux_value_coef * aux_loss
        _check_finite(loss, update)
        self.acc.backward(loss / cfg.gradient_accumulation_steps)
        return pg_loss, pst

    def _value_half(self, mb: Minibatch, values: torch.Tensor | None,
                    update: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped value loss (after the value model's forward unless `values` are given),
        backpropagated at its weight vf_coef."""
        cfg = self.cfg
        if values is None:
            with self.acc.autocast():
                values = self.inner.values(mb.ids, mb.att, mb.n_resp, trunk=mb.value_trunk, groups=mb.groups)
        vf_loss, vst = core.value_loss(values, mb.values, mb.returns, mb.mask, cfg.cliprange_value)
        _check_finite(vf_loss, update)
        self.acc.backward(cfg.vf_coef * vf_loss / cfg.gradient_accumulation_steps)
        return vf_loss, vst

    def _optimizer_step(self, which: int, step: bool = True) -> torch.Tensor:
        """Clip one model's gradient and step its optimizer (0: policy, 1: value; `step` False: clip
        and drop the gradient only, as in the critic warm-up); returns the norm. Each model is clipped
        on its own: one joint norm lets a large value gradient (early, while the values are far off)
        shrink the policy's step as well."""
        params = (self._policy_params, self._value_params)[which]
        clip, optimizer = self._steppers[which]
        # max_grad_norm 0: an infinite bound scales by exactly 1, so the norm is still logged
        norm = clip(params, self.cfg.max_grad_norm or math.inf)
        if step:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _score(self, prompts: list[Prompt], texts: list[str], has_stop: torch.Tensor) -> torch.Tensor:
        """The reward sources' mix, scaled, less the missing-stop penalty, clipped: what PPO maximises."""
        cfg = self.cfg
        scores = self.reward_fn(prompts, texts, has_stop.tolist()).float() * cfg.score_scale
        if self.stops:
            scores = scores - cfg.missing_eos_penalty * (~has_stop).float()
        if cfg.score_clip > 0:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return scores

    def _reward_parts(self) -> dict[str, float]:
        """The last scoring per reward source: its mean score (and the judge's failures and calls)."""
        return dict(getattr(self.reward_fn, "last", {}))

    def _update_row(self, update: int, b: Rollout, stats: dict[str, float], eps: float,
                    tps: float) -> dict[str, Any]:
        """The row of metrics.jsonl for one update, averaged over processes."""
        local = rollout_stats(b, stats)
        t = torch.tensor(list(local.values()), device=self.device, dtype=torch.float64)
        t = self.acc.reduce(t, "mean") if self.world > 1 else t
        row: dict[str, Any] = {"update": update, **dict(zip(local, t.tolist()))}
        row.update({"kl_coef": self.kl_coef, "lr": self.schedulers[0].get_last_lr()[0], "episodes_per_second": eps,
                    "tokens_per_second": tps, **{f"reward_{k}": v for k, v in b.reward_parts.items()}})
        check_row(row)
        return row

    def save_checkpoint(self, update: int) -> None:
        local = {"canonical_baselines": self.canonical.state()} if self.canonical is not None else None
        self.checkpoints.save(update, self.inner, self.optimizers, self.schedulers, self.kl_coef, local)

    def maybe_resume(self) -> None:
        """Continue from the folder's last checkpoint (when `resume` and there is one), else start fresh."""
        resumed = self.checkpoints.resume(self.inner, self.optimizers, self.schedulers, self.num_updates)
        if resumed is not None:
            self.start_update, self.kl_coef, local = resumed
            if self.canonical is not None and "canonical_baselines" in local:
                self.canonical.load(local["canonical_baselines"])
            if self.kl_ctl:
                self.kl_ctl.value = self.kl_coef

    # ---- evaluation and outputs -----------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Agreement, JSON validity, length and action mix on the held-out prompts, greedy and sampled,
        and the mean reward of sampled answers; every torch thread, since nothing runs beside it."""
        if not self.eval_prompts:
            return {}
        cfg, policy = self.cfg, self.inner.policy
        out: dict[str, Any] = {}
        with self.runner.all_threads():
            judged = evaluate_model(policy, self.tok, self.eval_prompts, temperature=cfg.temperature,
                                    max_new_tokens=cfg.response_length, seed=cfg.seed + 12345, draws=cfg.eval_draws)
            for mode in ("greedy", "sampled"):
                for key in ("agreement", "json_valid", "mean_length", "action_share"):
                    out[f"{key}_{mode}"] = judged[mode][key]
                if mode == "greedy":
                    out["samples"] = judged[mode]["samples"]
            # mean reward of sampled answers on held-out prompts (same sources as training): a sample of
            # its own, at its own seed, in one batch
            scored = evaluate_model(policy, self.tok, self.eval_prompts, modes=("sampled",),
                                    temperature=cfg.temperature, max_new_tokens=cfg.response_length,
                                    seed=cfg.seed + 999, batch_size=len(self.eval_prompts), score=self.reward_fn,
                                    draws=cfg.eval_draws)
            out["reward_mean"] = scored["sampled"]["reward_mean"]
        return out

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


def _check_batch(cfg: PPOConfig, world: int) -> None:
    """A batch splits evenly into processes, prompt groups, minibatches and micro-batches."""
    if cfg.batch_size % (world * cfg.samples_per_prompt):
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by processes x samples_per_prompt "
                        f"({world} x {cfg.samples_per_prompt}): a prompt's samples stay in one process")
    if cfg.batch_size % (world * cfg.num_mini_batches * cfg.gradient_accumulation_steps):
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by processes x num_mini_batches x "
                        f"gradient_accumulation_steps ({world} x {cfg.num_mini_batches} x "
                        f"{cfg.gradient_accumulation_steps})")


def _shuffled_rows(n: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """A random order of the n rows, in whole groups of `group` consecutive rows (a prompt's samples:
    its group baseline and, with share_prompts, its one sequence stay in one minibatch)."""
    if group == 1:
        return torch.randperm(n, generator=gen)
    return (torch.randperm(n // group, generator=gen)[:, None] * group + torch.arange(group)).flatten()


def _adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """One optimizer per model, so each thread steps its own model (the two states are what one
    optimizer over both would hold: AdamW keeps no state across parameters).
    eps as in transformers/TRL (1e-8): per-token-mean losses give tiny gradients, and the larger eps
    common in RL code (1e-5) silently shrinks the steps (measured: no learning in 6k episodes).
    fused: one kernel for all tensors instead of a Python loop over them (measured on CPU: an
    optimizer step 1.8 -> 0.3 ms on the 134k-parameter bench model, 28-58 -> 8-12 ms at 3M)."""
    fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(params, lr=lr, eps=1e-8, weight_decay=0.0, fused=fused)


Clip = Callable[[list[torch.nn.Parameter], float], torch.Tensor]


def _steppers(acc: Any, optimizers: list[Any]) -> list[tuple[Clip, Any]]:
    """(clip, optimizer) per model. One process without a loss scaler: torch's clip and the bare
    optimizer, which is what accelerate's wrappers call there, after checks of their own. Those cost
    0.35-0.45 ms per model and step on the tiny bench model measured alone; in training, with both
    models stepping on two threads, a model's step went 3.2-3.7 -> 2.0-2.4 ms. Else accelerate's,
    which reduce, unscale or hand off to DeepSpeed/FSDP."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.NO and getattr(acc, "scaler", None) is None:
        return [(torch.nn.utils.clip_grad_norm_, opt.optimizer) for opt in optimizers]
    return [(acc.clip_grad_norm_, opt) for opt in optimizers]


def _check_finite(loss: torch.Tensor, update: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at update {update}")


def run(cfg: PPOConfig) -> dict[str, Any]:
    quiet_transformers()
    trainer = PPOTrainer(cfg)
    out, is_main = trainer.out, trainer.acc.is_main_process
    try:
        metrics = trainer.train()
    except FloatingPointError as e:
        ck = trainer.checkpoints.dirs()
        where = f"; the last good checkpoint is {ck[-1]}" if ck else ""
        raise UserError(f"PPO stopped: {e}{where}. Lower --learning_rate or raise --kl_coef, then rerun "
                        "(it resumes from the checkpoint)") from None
    finally:
        trainer.runner.close()  # hand the torch threads back (the pipeline runs the next stage in this process)
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
