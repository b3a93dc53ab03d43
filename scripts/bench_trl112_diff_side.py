#!/usr/bin/env python
"""TRL 1.12's half of `scripts/bench_trl_diff.py`: one real PPO update of `trl.experimental.ppo.PPOTrainer`
on a bench model folder, with every tensor of the update written to a torch file.

Runs in the TRL 1.12 venv (trl==1.12.0, the last TRL with PPO) and imports nothing from `rlhf`:

    python scripts/bench_trl112_diff_side.py --model-dir ../shared/bench/tiny_qwen --out trl.pt

What it does (all in one process, CPU, fp32):
  A. "real": `PPOTrainer.train()` itself, untouched, for one update (total_episodes is kept at the bench's
     value so the lr schedule is the bench's; a callback stops training after the first update). The
     dataset is exactly the `--batch-size` prompts chosen, so the update's batch is all of them. The
     update's locals (rollout tensors, advantages, losses, ...) are read off `train()`'s frame with a
     line tracer (observation only), the gradients with a step pre-hook on the optimizer, the sampled
     tokens and generation logits by wrapping the module-level `batch_generation` (which still runs).
     `--force-responses` replaces some rows' sampled tokens (see RecordedGeneration).
  B. "transcribed": the PPO epochs of `train()` (ppo_trainer.py lines 793-840) transcribed with TRL's own
     `forward`, `selective_log_softmax`, `masked_mean` and `PolicyAndValueWrapper`, from the same initial
     weights, rollout and permutations; it must reproduce A's weights (checks the transcription).
  C. "mapped": B with the rollout recomputed in our layout (lines 740-786 transcribed, two changes): the
     score on the stop token instead of one after it, values zero after the stop, the value loss over
     tokens up to the stop. Optionally (`--clip-norms`) also with gradient clipping per model, as ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
import trl.experimental.ppo.ppo_trainer as trl_ppo  # noqa: E402
from bench_settings import add_bench_settings  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo.ppo_trainer import (  # noqa: E402
    INVALID_LOGPROB,
    PolicyAndValueWrapper,
    forward,
    masked_mean,
    masked_whiten,
    selective_log_softmax,
)

# names in PPOTrainer.train()'s frame whose tensors we keep (every distinct object bound to them, in order)
WATCH = ("queries", "query_responses", "responses", "postprocessed_responses", "logprobs", "ref_logprobs",
         "scores", "sequence_lengths", "values", "padding_mask", "padding_mask_p1", "kl", "non_score_reward",
         "rewards", "advantages", "returns", "b_inds", "new_logprobs", "vpred", "pg_loss", "vf_loss", "loss",
         "entropy", "contain_eos_token")


class LocalsTap:
    """A line tracer on one code object (PPOTrainer.train): after each line, keeps every new tensor bound
    to a watched name. Observation only: nothing in the frame is changed."""

    def __init__(self, code: Any) -> None:
        self.code = code
        self.seen: dict[str, list[Any]] = {n: [] for n in WATCH}

    def global_trace(self, frame: Any, event: str, arg: Any) -> Any:
        return self.local_trace if frame.f_code is self.code else None

    def local_trace(self, frame: Any, event: str, arg: Any) -> Any:
        loc = frame.f_locals
        for n in WATCH:
            v = loc.get(n)
            if isinstance(v, (torch.Tensor, np.ndarray)) and not any(v is s for s in self.seen[n]):
                self.seen[n].append(v)
        return self.local_trace

    def last(self, name: str) -> Any:
        vals = [v for v in self.seen[name] if isinstance(v, torch.Tensor)]
        return vals[-1]


class StopAfterFirstUpdate(Exception):
    pass


class StopCallback(TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        raise StopAfterFirstUpdate


class RecordedGeneration:
    """Stands in for trl's `batch_generation`: calls it (TRL's own sampling) and keeps what it returned.
    With `forced` ({prompt index: response token ids}), those rows' responses are replaced by the given
    tokens (other rows keep theirs, cut after their first eos), padded as HF's generate pads finished rows,
    and the logits of all rows are recomputed by one forward of the policy over the new tokens, divided by
    the generation temperature: what generate's `scores` are, up to float rounding."""

    def __init__(self, prompt_ids: list[list[int]], forced: dict[int, list[int]], eos: int) -> None:
        self.inner = trl_ppo.batch_generation
        self.prompt_ids, self.forced, self.eos = prompt_ids, forced, eos
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, model: Any, queries: torch.Tensor, batch: int, pad: int, config: Any) -> Any:
        out = self.inner(model, queries, batch, pad, config)
        if self.forced:
            ctx = queries.shape[1]
            rows = []
            for q, qr in zip(queries.tolist(), out[0][:, ctx:].tolist()):
                k = self.prompt_ids.index([t for t in q if t != pad])
                if k in self.forced:
                    rows.append(list(self.forced[k]))
                else:
                    rows.append(qr[:qr.index(self.eos) + 1] if self.eos in qr else qr)
            width = max(map(len, rows))
            resp = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=queries.dtype)
            qr = torch.cat([queries, resp], 1)
            with torch.no_grad():
                logits = forward(model, qr, pad).logits[:, ctx - 1:-1] / config.temperature
            out = (qr, logits)
        self.out = out
        return out


def named_params(policy: torch.nn.Module, value: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return ([(f"policy.{n}", p) for n, p in policy.named_parameters()]
            + [(f"value.{n}", p) for n, p in value.named_parameters()])


def state(policy: torch.nn.Module, value: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named_params(policy, value)}


def mapped_rollout(r: dict[str, torch.Tensor], kl_coef: float, gamma: float, lam: float,
                   score_at: str) -> dict[str, torch.Tensor]:
    """Rewards, GAE, returns and whitened advantages as in ppo_trainer.py lines 740-786, from the real
    rollout's logprobs, ref_logprobs, values, scores and sequence_lengths. score_at 'p1' is TRL's layout
    (must reproduce the real tensors); 'stop' is ours: the score on the stop token, values zero after it,
    the value loss up to it (vmask)."""
    responses, seq = r["responses"], r["sequence_lengths"]
    response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)  # 740
    padding_mask = response_idxs > seq.unsqueeze(1)  # 741
    logprobs = torch.masked_fill(r["logprobs"], padding_mask, INVALID_LOGPROB)  # 742
    ref_logprobs = torch.masked_fill(r["ref_logprobs"], padding_mask, INVALID_LOGPROB)  # 743
    seq_p1 = seq + 1  # 744
    padding_mask_p1 = response_idxs > seq_p1.unsqueeze(1)  # 745
    vmask = padding_mask_p1 if score_at == "p1" else padding_mask  # ours: values zero after the stop
    values = torch.masked_fill(r["values"], vmask, 0)  # 746
    logr = ref_logprobs - logprobs  # 750
    kl = -logr  # 751 (k1)
    non_score_reward = -kl_coef * kl  # 752
    rewards = non_score_reward.clone()  # 753
    rows = torch.arange(rewards.size(0))  # 754
    if score_at == "p1":
        end = torch.where(seq_p1 < rewards.size(1), seq_p1, seq)  # 755
    else:
        end = seq  # ours: the score on the stop token (the last valid token)
    rewards[rows, end] += r["scores"]  # 756
    lastgaelam = 0  # 764
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):  # 767-771
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)  # 772
    returns = advantages + values  # 773
    advantages = masked_whiten(advantages, ~padding_mask)  # 774
    advantages = torch.masked_fill(advantages, padding_mask, 0)  # 775
    return {"kl": kl, "non_score_reward": non_score_reward, "rewards": rewards, "values": values,
            "advantages": advantages, "returns": returns, "padding_mask": padding_mask, "vmask": vmask,
            "logprobs": logprobs}


def transcribed_update(trainer: PPOTrainer, init: dict[str, torch.Tensor], roll: dict[str, torch.Tensor],
                       m: dict[str, torch.Tensor], perms: list[np.ndarray], clip: float | None) -> dict[str, Any]:
    """The PPO epochs of PPOTrainer.train() (ppo_trainer.py lines 793-840), on fresh copies of the models
    at `init`, with the optimizer TRL's trainer builds (same class and hyperparameters). clip: gradient
    clipping per model (policy, value) at this norm before each step, as our trainer does; None: none (TRL)."""
    args = trainer.args
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    policy, value = copy.deepcopy(wrapper.policy), copy.deepcopy(wrapper.value_model)
    with torch.no_grad():
        for n, p in named_params(policy, value):
            p.copy_(init[n])
    model = PolicyAndValueWrapper(policy, value)
    model.train()
    opt_cls, opt_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = opt_cls([p for p in model.parameters() if p.requires_grad], weight_decay=args.weight_decay,
                        **opt_kwargs)
    pad = trainer.processing_class.pad_token_id
    context_length = roll["queries"].shape[1]
    query_responses, responses = roll["query_responses"], roll["responses"]
    advantages, returns, values, logprobs = m["advantages"], m["returns"], m["values"], m["logprobs"]
    padding_mask, vmask = m["padding_mask"], m["vmask"]
    steps: list[dict[str, Any]] = []
    for epoch in range(args.num_ppo_epochs):
        b_inds = perms[epoch]  # 794: np.random.permutation in the real run; the same ones here
        for mini_batch_start in range(0, args.local_batch_size, args.local_mini_batch_size):
            mini_batch_inds = b_inds[mini_batch_start:mini_batch_start + args.local_mini_batch_size]
            for micro_batch_start in range(0, args.local_mini_batch_size, args.per_device_train_batch_size):
                inds = mini_batch_inds[micro_batch_start:micro_batch_start + args.per_device_train_batch_size]
                mb_advantage, mb_responses = advantages[inds], responses[inds]  # 805-810
                mb_query_responses, mb_logprobs = query_responses[inds], logprobs[inds]
                mb_return, mb_values = returns[inds], values[inds]
                output, vpred_temp = forward(model, mb_query_responses, pad)  # 812
                logits = output.logits[:, context_length - 1:-1]
                logits /= args.temperature + 1e-7
                new_logprobs = selective_log_softmax(logits, mb_responses)
                new_logprobs = torch.masked_fill(new_logprobs, padding_mask[inds], INVALID_LOGPROB)
                vpred = vpred_temp[:, context_length - 1:-1].squeeze(-1)
                vpred = torch.masked_fill(vpred, vmask[inds], 0)  # TRL: padding_mask_p1
                vpredclipped = torch.clamp(vpred, mb_values - args.cliprange_value, mb_values + args.cliprange_value)
                vf_losses1 = torch.square(vpred - mb_return)
                vf_losses2 = torch.square(vpredclipped - mb_return)
                vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~vmask[inds])
                logprobs_diff = new_logprobs - mb_logprobs
                ratio = torch.exp(logprobs_diff)
                pg_losses = -mb_advantage * ratio
                pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
                pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask[inds])
                loss = pg_loss + args.vf_coef * vf_loss  # 835
                loss.backward()  # 836 (accelerator.backward: one process, no scaler)
                grads = {n: p.grad.detach().clone() for n, p in named_params(policy, value) if p.grad is not None}
                norms = {}
                if clip is not None:
                    for which, mod in (("policy", policy), ("value", value)):
                        norms[which] = float(torch.nn.utils.clip_grad_norm_(list(mod.parameters()), clip))
                optimizer.step()  # 837
                optimizer.zero_grad()
                steps.append({"pg_loss": float(pg_loss), "vf_loss": float(vf_loss), "norms": norms,
                              "grads": grads if not steps else None,
                              "new_logprobs": new_logprobs.detach() if not steps else None,
                              "vpred": vpred.detach() if not steps else None, "inds": np.asarray(inds)})
    return {"steps": steps, "weights": state(policy, value), "optimizer": repr(optimizer.defaults)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompt-offset", type=int, default=0, help="the batch: prompts.jsonl rows offset.. offset+batch")
    add_bench_settings(ap)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--clip-norms", default="", help="comma-separated: also run C with per-model clipping at these")
    ap.add_argument("--force-responses", default="",
                    help="JSON file {prompt index in the batch: response token ids}: those rows' responses")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    policy_dir = os.path.join(args.model_dir, "policy")
    reward_dir = os.path.join(args.model_dir, "reward")
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    with open(os.path.join(args.model_dir, "prompts.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line)["messages"] for line in f if line.strip()]
    rows = rows[args.prompt_offset:args.prompt_offset + args.batch_size]
    # as bench_trl112_runner.py: chat template with the generation prompt, tokenized without special tokens
    ids = [tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
           ["input_ids"] for m in rows]
    dataset = Dataset.from_dict({"input_ids": ids})

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl-output")
    cfg = PPOConfig(  # as bench_trl112_runner.py
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=args.ppo_epochs, response_length=args.response_length,
        total_episodes=args.episodes, local_rollout_forward_batch_size=args.batch_size, learning_rate=args.lr,
        kl_coef=args.kl_coef, temperature=args.temperature, stop_token="eos", num_sample_generations=0,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, fp16=False, use_cpu=True,
        seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    forced = {}
    if args.force_responses:
        with open(args.force_responses, encoding="utf-8") as f:
            forced = {int(k): v for k, v in json.load(f).items()}
    gen = RecordedGeneration(ids, forced, tok.eos_token_id)
    trl_ppo.batch_generation = gen
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, callbacks=[StopCallback()])
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    init = state(wrapper.policy, wrapper.value_model)
    torch_opt = trainer.optimizer.optimizer
    names = {id(p): n for n, p in named_params(wrapper.policy, wrapper.value_model)}
    step_grads: list[dict[str, torch.Tensor]] = []
    step_lrs: list[float] = []

    def pre_step(opt: Any, *a: Any) -> None:
        step_lrs.append(opt.param_groups[0]["lr"])
        grads = {names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                 if p.grad is not None}
        step_grads.append(grads)

    torch_opt.register_step_pre_hook(pre_step)

    # hidden_states[-1] (what TRL's get_reward and PolicyAndValueWrapper read) vs the backbone's output
    probe = torch.tensor([ids[0]])
    with torch.no_grad():
        o = wrapper.value_model.model(input_ids=probe, output_hidden_states=True)
    hidden_last_is_normed = bool(torch.equal(o.hidden_states[-1], o.last_hidden_state))

    tap = LocalsTap(PPOTrainer.train.__code__)
    sys.settrace(tap.global_trace)
    try:
        trainer.train()
        stopped = False
    except StopAfterFirstUpdate:
        stopped = True
    finally:
        sys.settrace(None)
    if not stopped:
        raise SystemExit("train() ended without reaching the end of the first update")
    lr_after = trainer.lr_scheduler.get_last_lr()[0]
    real_weights = state(wrapper.policy, wrapper.value_model)

    roll = {n: tap.last(n).detach().clone() for n in ("queries", "query_responses", "responses",
                                                      "postprocessed_responses", "logprobs", "ref_logprobs",
                                                      "scores", "sequence_lengths", "values", "padding_mask",
                                                      "padding_mask_p1", "kl", "non_score_reward", "rewards",
                                                      "advantages", "returns", "contain_eos_token")}
    # `advantages` is bound three times (raw, whitened, masked); the raw one for reference
    roll["advantages_raw"] = [v for v in tap.seen["advantages"] if isinstance(v, torch.Tensor)][0].detach().clone()
    perms = [v for v in tap.seen["b_inds"] if isinstance(v, np.ndarray)]
    pg = [float(v.detach()) for v in tap.seen["pg_loss"]]
    vf = [float(v.detach()) for v in tap.seen["vf_loss"]]
    first_new_logprobs = [v for v in tap.seen["new_logprobs"] if isinstance(v, torch.Tensor)]
    first_vpred = [v for v in tap.seen["vpred"] if isinstance(v, torch.Tensor)]
    first_entropy = [v for v in tap.seen["entropy"] if isinstance(v, torch.Tensor)]
    def unpermuted(x: torch.Tensor) -> torch.Tensor:  # the first minibatch's rows are in perms[0]'s order
        out = torch.empty_like(x)
        out[torch.as_tensor(perms[0])] = x.detach()
        return out

    assert len(perms) == args.ppo_epochs and len(step_grads) == args.ppo_epochs, (len(perms), len(step_grads))
    # the values before TRL's masked_fill (for the mapped layout): the first tensor bound to `values`
    values_raw = [v for v in tap.seen["values"] if isinstance(v, torch.Tensor)][0].detach().clone()
    roll_for_map = {**roll, "values": values_raw}

    queries = roll["queries"]
    prompt_index = []
    for row in queries.tolist():
        toks = [t for t in row if t != tok.pad_token_id]
        prompt_index.append(ids.index(toks))

    result: dict[str, Any] = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "config": {k: getattr(cfg, k) for k in ("learning_rate", "kl_coef", "temperature", "vf_coef", "cliprange",
                                                "cliprange_value", "gamma", "lam", "kl_estimator", "whiten_rewards",
                                                "missing_eos_penalty", "num_total_batches", "weight_decay",
                                                "max_grad_norm", "optim", "lr_scheduler_type", "adam_epsilon")},
        "optimizer": {"class": type(torch_opt).__name__, "defaults": repr(torch_opt.defaults),
                      "groups": [{k: v for k, v in g.items() if k != "params"} for g in torch_opt.param_groups]},
        "hidden_last_is_normed": hidden_last_is_normed,
        "prompt_index": prompt_index, "prompt_rows": rows, "prompt_offset": args.prompt_offset,
        "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
        "forced": forced,
        "rollout": roll, "values_raw": values_raw, "perms": perms,
        "real": {"pg_losses": pg, "vf_losses": vf, "grads": step_grads[0],
                 "grad_norms": [{n: float(g.norm()) for n, g in s.items()} for s in step_grads],
                 "new_logprobs": unpermuted(first_new_logprobs[0]), "vpred": unpermuted(first_vpred[0]),
                 "entropy": unpermuted(first_entropy[0]), "lrs": step_lrs, "lr_after": lr_after,
                 "weights": real_weights},
        "init": init,
    }
    m_p1 = mapped_rollout(roll_for_map, cfg.kl_coef, cfg.gamma, cfg.lam, "p1")
    result["transcribed_rollout_maxdiff"] = {
        k: float((m_p1[k] - roll[k]).abs().max()) for k in ("kl", "non_score_reward", "rewards", "values",
                                                           "advantages", "returns")}
    result["transcribed"] = transcribed_update(trainer, init, roll, m_p1, perms, None)
    m_stop = mapped_rollout(roll_for_map, cfg.kl_coef, cfg.gamma, cfg.lam, "stop")
    result["mapped_rollout"] = {k: v for k, v in m_stop.items()}
    result["mapped"] = {"none": transcribed_update(trainer, init, roll, m_stop, perms, None)}
    for c in [float(x) for x in args.clip_norms.split(",") if x.strip()]:
        result["mapped"][repr(c)] = transcribed_update(trainer, init, roll, m_stop, perms, c)
    torch.save(result, args.out)
    print(f"wrote {args.out}: response width {roll['responses'].shape[1]}, "
          f"stops {roll['contain_eos_token'].tolist()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
