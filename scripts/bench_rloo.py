#!/usr/bin/env python
"""A maintained peer for our PPO: TRL 1.16's RLOOTrainer on the same models, prompts and budget, over seeds.

    # RLOO on the SFT policy and reward model of a pipeline run (e.g. `bash scripts/demo.sh --output_dir /tmp/d0`):
    python scripts/bench_rloo.py --run /tmp/d0 --seeds 0-4 --out /tmp/rloo-d0
    # ... with our PPO's seed study of the same run beside it (`scripts/seed_study.py ppo --out /tmp/st-d0`):
    python scripts/bench_rloo.py --run /tmp/d0 --seeds 0-4 --out /tmp/rloo-d0 --ours /tmp/st-d0
    # any RLOOConfig field changed (TRL's KL coefficient, 4 passes per batch as our PPO's 4 epochs):
    python scripts/bench_rloo.py --run /tmp/d0 --seeds 0-4 --out /tmp/rloo-b05 --set beta=0.05 --set num_iterations=4
    # a quick check of the plumbing (256 episodes, one thread):
    python scripts/bench_rloo.py --run /tmp/d0 --seeds 0 --episodes 256 --threads 1 --out /tmp/rloo-smoke

Each seed runs in its own process (this script with --worker-seed), one after another, so timings are
comparable and a crash loses one seed only; a seed whose OUT/rloo-seed{S}.json exists is read back, not
rerun. Written to OUT: rloo-seed{S}.json and .log per seed, rloo.md (the table, also printed).

What is the same as our PPO run (its settings: RUN/ppo/rlhf_config.yaml where `rlhf ppo` wrote one; a
pipeline writes only RUN/rlhf_config.yaml, whose `ppo` section is resolved over PPOConfig's defaults):
- models: the policy starts from RUN/sft, fully fine-tuned (the reference is a frozen copy), fp32, CPU;
  the reward is the sequence-classification model in RUN/reward, passed to RLOOTrainer as a model with
  its tokenizer as the reward processing class;
- prompts: `prompt` of RUN/data/train.jsonl for training; the first `eval_prompts` of test.jsonl for the
  evaluation, which is our PPO's own (`rlhf.generation.evaluate_model`, greedy and sampled at the run's
  temperature, `response_length` new tokens, sampling seed = seed + 12345), before and after training;
- budget: `total_episodes` completions (--episodes overrides), at most `response_length` tokens each
  (max_completion_length), sampled at `temperature` (top_k, top_p as ours);
- batch: `batch_size` completions per optimizer step. RLOOConfig counts completions too:
  per_device_train_batch_size = batch_size / gradient_accumulation_steps (1 process), of which
  num_generations (k, default 4 here, TRL's 2) answers per prompt, so batch 64 = 16 prompts x 4 answers;
  one generation per optimizer step (steps_per_generation = gradient_accumulation_steps). max_steps is
  derived from the episodes: episodes / generation_batch_size generations, each used for
  num_iterations x steps_per_generation / gradient_accumulation_steps optimizer steps (demo: 8192 / 64 =
  128 steps); the episodes actually sampled are counted and written down;
- optimisation: learning_rate, constant or linear schedule as `lr_schedule`, no warm-up, AdamW eps 1e-8,
  no weight decay, max_grad_norm, beta = our kl_coef (TRL's default is 0.05), epsilon = our cliprange,
  dropout off, gradient checkpointing off (TRL's default is on), bf16/fp16 off, report_to none,
  torch.set_num_threads(--threads).
- reward scale (--reward-scale heldout, the default): the reward head's weights are divided by the held-out
  score std the reward stage wrote (reward_normalization.json), which is our standardisation except its
  shift; a constant shift cancels exactly in RLOO's leave-one-out baseline (and in beta x KL). TRL cannot
  standardise a reward model itself, and RLOO's normalize_advantages is off by default, so the scale
  weighs the reward against beta x KL and against gradient clipping. `raw` passes the scores as trained.
- missing stop token: our PPO subtracts `missing_eos_penalty` from the score of an answer with no stop
  token; RLOO has no such option, so a second reward function (weight 1) adds -penalty to those answers
  (--missing-eos-penalty, default ours; 0 turns it off). Both score a cut-off answer with its turn closed
  by the chat template (TRL decodes without special tokens and re-renders; ours is score_unfinished closed).

What differs, by design of RLOO: no critic and no GAE; the advantage is the score minus the mean of the
prompt's other k-1 answers, not whitened (ours: GAE advantages whitened per batch); KL is the sum over
tokens of k1 (sampling policy vs reference), subtracted once from the sequence's reward (ours: per-token
-beta x k1 rewards through GAE, the same total with gamma 1); the loss is per sequence (summed token
log-probs, so gradient norms run 0.6-4 on the demo and max_grad_norm 1.0 clips often; ours ~0.1);
with num_iterations 1 each batch gets one gradient step and the ratio is 1, so the clip never acts
(ours: 4 PPO epochs); 16 distinct prompts per batch at k=4 (ours: 64).

The table: greedy and sampled agreement before -> after, KL at the end (TRL logs a per-token mean; times
the mean completion length it is nats per sequence, the unit of our kl_final), training seconds (the
trainer's train() call), episodes/s; a mean row; how many seeds cleared --lift greedy and sampled. With
--ours (a `seed_study.py ppo` folder) our numbers for the same seeds stand beside RLOO's. Each seed's JSON
also has where the time went: generate, score (reward model), forward (old and reference log-probs), update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from seed_study import parse_seeds, parse_sets

REPO = Path(__file__).resolve().parents[1]
DEFAULT_K = 4  # answers per prompt; TRL's default is 2, 4 keeps a 64-batch at 16 prompts


def read_ppo_settings(run: Path) -> dict[str, Any]:
    """Our PPO's full settings for a run folder: RUN/ppo/rlhf_config.yaml where `rlhf ppo` wrote one; else
    the pipeline's record (RUN/rlhf_config.yaml, which the pipeline writes instead): its `ppo` section and
    shared keys over PPOConfig's defaults, resolved as the pipeline resolves them."""
    for need in (run / "sft", run / "reward", run / "data" / "train.jsonl"):
        if not need.exists():
            raise SystemExit(f"{run}: not a finished pipeline run folder (no {need.relative_to(run)})")
    own = run / "ppo" / "rlhf_config.yaml"
    if own.is_file():
        cfg = yaml.safe_load(own.read_text())
    else:
        from rlhf.config import build, to_dict
        from rlhf.pipeline import SHARED
        from rlhf.ppo.config import PPOConfig

        record = run / "rlhf_config.yaml"
        if not record.is_file():
            raise SystemExit(f"{run}: neither ppo/rlhf_config.yaml nor rlhf_config.yaml")
        top = yaml.safe_load(record.read_text()) or {}
        fields = {f.name for f in dataclasses.fields(PPOConfig)}
        values = {k: top[k] for k in SHARED if k in fields and top.get(k) is not None}
        values.update({k: v for k, v in (top.get("ppo") or {}).items() if k != "enabled"})
        cfg = to_dict(build(PPOConfig, values, f"{record}: section 'ppo'"))
    if cfg.get("use_lora"):
        raise SystemExit(f"{run}: our PPO used use_lora true; this bench fine-tunes the whole policy (as the demo)")
    if set(cfg.get("rewards") or {"model": 1.0}) != {"model"}:
        print(f"note: our PPO used rewards {cfg['rewards']}; RLOO here gets the reward model only", flush=True)
    return cfg


# ---- one seed (the worker process) ------------------------------------------------------------------
def evaluate(model: Any, tok: Any, prompts: list[Any], ppo: dict[str, Any], seed: int) -> dict[str, Any]:
    """PPOTrainer.evaluate's agreement part, the same call: same prompts, modes, temperature, tokens, seed."""
    from rlhf.generation import evaluate_model

    r = evaluate_model(model, tok, prompts, temperature=ppo["temperature"], max_new_tokens=ppo["response_length"],
                       seed=seed + 12345, draws=ppo.get("eval_draws", 1))
    return {mode: {k: r[mode][k] for k in ("agreement", "json_valid", "mean_length", "action_share")}
            for mode in ("greedy", "sampled")}


def timed_trainer_class() -> type:
    """RLOOTrainer that adds up where its rollout time goes and counts the completions it trains on."""
    from trl import RLOOTrainer

    class TimedRLOOTrainer(RLOOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.timing = {"generate": 0.0, "score": 0.0, "forward": 0.0}
            self.episodes = 0
            super().__init__(*args, **kwargs)

        def _generate(self, prompts: list) -> Any:
            t = time.perf_counter()
            out = super()._generate(prompts)
            self.timing["generate"] += time.perf_counter() - t
            return out

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            self.timing["score"] += time.perf_counter() - t
            return out

        def _generate_and_score_completions(self, inputs: list) -> Any:
            t, before = time.perf_counter(), self.timing["generate"] + self.timing["score"]
            out = super()._generate_and_score_completions(inputs)
            inner = self.timing["generate"] + self.timing["score"] - before
            self.timing["forward"] += time.perf_counter() - t - inner  # old and reference log-probs, advantages
            self.episodes += len(inputs)
            return out

    return TimedRLOOTrainer


def reward_model(run: Path, scale: str) -> tuple[Any, Any, float]:
    """(model, tokenizer, divisor): the reward model with its head divided by the held-out std when asked."""
    import torch

    from rlhf.models import load_tokenizer, load_value_model
    from rlhf.rewards.model import reward_normalization

    tok = load_tokenizer(str(run / "reward"), padding_side="right")
    model = load_value_model(str(run / "reward"), pad_token_id=tok.pad_token_id).eval()
    model.requires_grad_(False)
    stats = reward_normalization(run / "reward") if scale == "heldout" else None
    if scale == "heldout" and stats is None:
        raise SystemExit(f"{run / 'reward'}: no reward_normalization.json; use --reward-scale raw")
    std = stats[1] if stats else 1.0
    with torch.no_grad():
        for p in model.score.parameters():  # weight (and a bias if any): score / std, exactly
            p.div_(std)
    return model, tok, std


def missing_eos_reward(stops: list[int], penalty: float) -> Any:
    """A TRL reward function: -penalty for an answer that ran out of tokens before a stop token."""

    def missing_eos(completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [0.0 if ids and ids[-1] in stops else -penalty for ids in completion_ids]

    return missing_eos


def rloo_config(ppo: dict[str, Any], a: argparse.Namespace, seed: int, sets: dict[str, Any], out: str) -> Any:
    """RLOOConfig for the same budget as our PPO run; --set fields last. Returns it with max_steps set."""
    from trl import RLOOConfig

    known = {f.name for f in dataclasses.fields(RLOOConfig)}
    unknown = sorted(set(sets) - known)
    if unknown:
        raise SystemExit(f"--set: {', '.join(unknown)} not RLOOConfig field(s) in this TRL")
    accum = int(sets.get("gradient_accumulation_steps", 1))
    if ppo["batch_size"] % accum:
        raise SystemExit(f"batch_size {ppo['batch_size']} is not divisible by gradient_accumulation_steps {accum}")
    kwargs: dict[str, Any] = dict(
        output_dir=out, seed=seed, data_seed=seed, use_cpu=True, bf16=False, fp16=False, report_to="none",
        per_device_train_batch_size=ppo["batch_size"] // accum, gradient_accumulation_steps=accum,
        num_generations=DEFAULT_K, max_completion_length=ppo["response_length"],
        temperature=ppo["temperature"], top_k=ppo.get("top_k", 0), top_p=ppo.get("top_p", 1.0),
        learning_rate=ppo["learning_rate"], warmup_steps=0, weight_decay=0.0, adam_epsilon=1e-8,
        lr_scheduler_type="constant" if ppo.get("lr_schedule") == "constant" else "linear",
        max_grad_norm=ppo.get("max_grad_norm", 1.0), beta=ppo["kl_coef"], epsilon=ppo.get("cliprange", 0.2),
        gradient_checkpointing=False, disable_dropout=True, logging_steps=1, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    kwargs.update(sets)
    args = RLOOConfig(**kwargs)
    if "max_steps" not in sets:
        episodes = a.episodes or ppo["total_episodes"]
        generations = episodes // args.generation_batch_size
        steps = generations * args.num_iterations * args.steps_per_generation / args.gradient_accumulation_steps
        if generations < 1 or steps != int(steps):
            raise SystemExit(f"{episodes} episodes do not make whole optimizer steps of generation batch "
                             f"{args.generation_batch_size}; change --episodes or the batch settings")
        args.max_steps = int(steps)
    return args


def final_log(history: list[dict[str, Any]]) -> dict[str, Any]:
    """KL, reward and length at the last logged step, plus the per-step curve (one log per step)."""
    rows = [r for r in history if "reward" in r]
    curve = [{k: r.get(k) for k in ("step", "reward", "kl", "completions/mean_length", "entropy",
                                    "completions/clipped_ratio", "grad_norm")} for r in rows]
    last = rows[-1] if rows else {}
    kl, length = last.get("kl"), last.get("completions/mean_length")
    return {"kl_per_token": kl, "kl": kl * length if kl is not None and length is not None else None,
            "mean_length_final": length, "reward_first": rows[0]["reward"] if rows else None,
            "reward_final": last.get("reward"), "curve": curve}


def run_seed(a: argparse.Namespace, seed: int, sets: dict[str, Any]) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset

    from rlhf.data.schema import PROMPT_COLUMNS, load_rows, resolve_split
    from rlhf.models import ModelOptions, load_causal_lm, load_tokenizer, stop_token_ids
    from rlhf.training import quiet_transformers, seed_everything

    quiet_transformers()
    torch.set_num_threads(a.threads)
    seed_everything(seed)
    run = Path(a.run)
    ppo = read_ppo_settings(run)
    data = str(run / "data")
    # prompts exactly as PPOTrainer._load_data reads them
    train = [r["prompt"] for r in load_rows(resolve_split(data, "train"), PROMPT_COLUMNS)]
    test = load_rows(resolve_split(data, "test"), PROMPT_COLUMNS)
    eval_prompts = [r["prompt"] for r in test[: ppo["eval_prompts"]]]
    tok = load_tokenizer(str(run / "sft"), padding_side="left")
    stops = stop_token_ids(tok)
    policy = load_causal_lm(str(run / "sft"), ModelOptions(dtype="float32", use_lora=False))
    policy.generation_config.eos_token_id = stops  # RLOO stops at these, as our PPO does
    before = evaluate(policy, tok, eval_prompts, ppo, seed)
    rm, rm_tok, rm_std = reward_model(run, a.reward_scale)
    funcs, classes = [rm], [rm_tok]
    if a.missing_eos_penalty > 0:
        funcs.append(missing_eos_reward(stops, a.missing_eos_penalty))
        classes.append(None)
    with tempfile.TemporaryDirectory(prefix="rloo-") as tmp:  # nothing is saved: save_strategy "no"
        args = rloo_config(ppo, a, seed, sets, tmp)
        trainer = timed_trainer_class()(model=policy, reward_funcs=funcs, args=args,
                                        train_dataset=Dataset.from_list([{"prompt": p} for p in train]),
                                        processing_class=tok, reward_processing_classes=classes)
        t = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t
    after = evaluate(trainer.accelerator.unwrap_model(trainer.model), tok, eval_prompts, ppo, seed)
    return {"seed": seed, "trl_version": trl.__version__, "threads": a.threads,
            **agreement_fields(before, after), **final_log(trainer.state.log_history),
            **speed_fields(trainer, train_seconds),
            "reward_scale": a.reward_scale, "reward_divided_by": rm_std, "missing_eos_penalty": a.missing_eos_penalty,
            "rloo_config": {k: getattr(args, k) for k in RECORDED_RLOO_FIELDS},
            "ppo_settings": {k: ppo.get(k) for k in RECORDED_PPO_KEYS}}


RECORDED_RLOO_FIELDS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations", "generation_batch_size",
    "steps_per_generation", "num_iterations", "max_steps", "max_completion_length", "temperature", "top_k", "top_p",
    "learning_rate", "lr_scheduler_type", "beta", "epsilon", "normalize_advantages", "max_grad_norm",
    "mask_truncated_completions")
RECORDED_PPO_KEYS = ("total_episodes", "batch_size", "response_length", "temperature", "learning_rate",
                     "lr_schedule", "kl_coef", "num_ppo_epochs", "missing_eos_penalty", "eval_prompts")


def agreement_fields(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The evaluation, flat under seed_study.py's names, and in full."""
    return {"greedy_before": before["greedy"]["agreement"], "greedy_after": after["greedy"]["agreement"],
            "sampled_before": before["sampled"]["agreement"], "sampled_after": after["sampled"]["agreement"],
            "json_valid_after": after["greedy"]["json_valid"], "actions_after": after["greedy"]["action_share"],
            "actions_sampled_after": after["sampled"]["action_share"], "before": before, "after": after}


def speed_fields(trainer: Any, train_seconds: float) -> dict[str, Any]:
    """Episodes actually sampled, optimizer steps, and where the training time went."""
    split = {**trainer.timing, "update": train_seconds - sum(trainer.timing.values())}  # update: the rest
    return {"episodes": trainer.episodes, "optimizer_steps": trainer.state.global_step,
            "train_seconds": round(train_seconds, 2), "episodes_per_second": trainer.episodes / train_seconds,
            "time_split_seconds": {k: round(v, 2) for k, v in split.items()}}


def study_key(a: argparse.Namespace) -> dict[str, Any]:
    """What a seed's result depends on besides the seed: a resumed study must not mix settings."""
    return {"run": str(Path(a.run).resolve()), "episodes": a.episodes, "set": a.set, "threads": a.threads,
            "reward_scale": a.reward_scale, "missing_eos_penalty": a.missing_eos_penalty}


def worker(a: argparse.Namespace, seed: int) -> int:
    from rlhf.io import atomic_write_json

    result = {"study": study_key(a), **run_seed(a, seed, parse_sets(a.set, "KEY an RLOOConfig field"))}
    atomic_write_json(Path(a.out) / f"rloo-seed{seed}.json", result)  # written whole or not at all: resumable
    print(f"seed {seed}: greedy {result['greedy_before']:.2f} -> {result['greedy_after']:.2f}, sampled "
          f"{result['sampled_before']:.2f} -> {result['sampled_after']:.2f}, KL {fmt(result['kl'], '.2f')}/seq, "
          f"{result['episodes']} episodes in {result['train_seconds']:.1f} s", flush=True)
    return 0


# ---- the study (the parent process) -----------------------------------------------------------------
def worker_command(a: argparse.Namespace, seed: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-seed", str(seed), "--run", a.run,
           "--out", a.out, "--threads", str(a.threads), "--reward-scale", a.reward_scale]
    if a.episodes:
        cmd += ["--episodes", str(a.episodes)]
    cmd += ["--missing-eos-penalty", str(a.missing_eos_penalty)]
    for item in a.set:
        cmd += ["--set", item]
    return cmd


def read_ours(folder: Path) -> dict[int, dict[str, Any]]:
    """Our PPO's seed study (scripts/seed_study.py ppo): per seed its study.json row, with the train
    seconds and episodes/s of that seed's metrics.json when the seed's folder is still there."""
    study = json.loads((folder / "study.json").read_text())
    out: dict[int, dict[str, Any]] = {}
    for r in study["results"]:
        row = dict(r)
        metrics = folder / f"seed-{r['seed']}" / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            row.update(train_seconds=m.get("train_seconds_this_run"), episodes_per_second=m.get("episodes_per_second"))
        out[r["seed"]] = row
    return out


def cleared(r: dict[str, Any], lift: float) -> bool:
    return r["greedy_after"] - r["greedy_before"] >= lift and r["sampled_after"] - r["sampled_before"] >= lift


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def cells(r: dict[str, Any] | None, rloo: bool) -> list[str]:
    if r is None:
        return ["-"] * 5
    out = [f"{r['greedy_before']:.2f} -> {r['greedy_after']:.2f}",
           f"{r['sampled_before']:.2f} -> {r['sampled_after']:.2f}"]
    out.append(f"{fmt(r['kl'], '.2f')} ({fmt(r['kl_per_token'], '.3f')})" if rloo else fmt(r.get("kl"), ".2f"))
    out += [fmt(r.get("train_seconds"), ".0f"), fmt(r.get("episodes_per_second"), ".1f")]
    return out


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    keys = ("greedy_before", "greedy_after", "sampled_before", "sampled_after", "kl", "kl_per_token",
            "train_seconds", "episodes_per_second")
    return {k: mean(k) for k in keys}


def table(results: list[dict[str, Any]], ours: dict[int, dict[str, Any]] | None, lift: float) -> str:
    head = ["seed", "RLOO greedy", "RLOO sampled", "RLOO KL/seq (/token)", "RLOO train s", "RLOO ep/s"]
    if ours is not None:
        head += ["ours greedy", "ours sampled", "ours KL", "ours train s", "ours ep/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [str(r["seed"]), *cells(r, True)] + ([] if ours is None else cells(ours.get(r["seed"]), False))
        lines.append("| " + " | ".join(row) + " |")
    paired = [ours[r["seed"]] for r in results if ours and r["seed"] in ours]
    mean = ["**mean**", *cells(mean_row(results), True)] + ([] if ours is None else
                                                            cells(mean_row(paired) if paired else None, False))
    lines += ["| " + " | ".join(mean) + " |", ""]
    n = sum(cleared(r, lift) for r in results)
    text = f"RLOO: {n} of {len(results)} seeds cleared +{lift:.2f} greedy and sampled."
    if ours is not None:
        text += f" Ours: {sum(cleared(r, lift) for r in paired)} of {len(paired)} (same seeds)."
    lines.append(text)
    return "\n".join(lines) + "\n"


def time_split(results: list[dict[str, Any]]) -> str:
    total = sum(r["train_seconds"] for r in results) or 1.0
    parts = {k: sum(r["time_split_seconds"][k] for r in results) for k in results[0]["time_split_seconds"]}
    text = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts.items())
    return f"RLOO's training time, all seeds: {text} (forward: old and reference log-probs).\n"


def reference_line(run: Path) -> str:
    """Our PPO's result in the run folder itself (one seed), for a study without --ours."""
    path = run / "ppo" / "metrics.json"
    if not path.is_file():
        return ""
    m = json.loads(path.read_text())
    seed = read_ppo_settings(run).get("seed")
    return (f"Our PPO in {run / 'ppo'} (seed {seed}): greedy {m['agreement_before']:.2f} -> "
            f"{m['agreement_after']:.2f}, sampled {m['agreement_sampled_before']:.2f} -> "
            f"{m['agreement_sampled_after']:.2f}, KL {m['kl_final']:.2f}, {m['train_seconds_this_run']:.0f} s "
            f"training, {m['episodes_per_second']:.1f} episodes/s.\n")


def settings_line(r: dict[str, Any]) -> str:
    c, p = r["rloo_config"], r["ppo_settings"]
    return (f"TRL {r['trl_version']} RLOOTrainer, {r['episodes']} episodes (ours {p['total_episodes']}), "
            f"{c['max_steps']} optimizer steps of {c['per_device_train_batch_size'] * c['gradient_accumulation_steps']}"
            f" completions ({c['generation_batch_size'] // c['num_generations']} prompts x k={c['num_generations']}),"
            f" num_iterations {c['num_iterations']}, lr {c['learning_rate']:g} {c['lr_scheduler_type']}, "
            f"beta {c['beta']:g}, T {c['temperature']:g}, {c['max_completion_length']} tokens, "
            f"normalize_advantages {c['normalize_advantages']}, reward {r['reward_scale']} "
            f"(/{r['reward_divided_by']:.3f}), missing-EOS penalty {r['missing_eos_penalty']:g}, "
            f"{r['threads']} threads.\n")


def study(a: argparse.Namespace) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    read_ppo_settings(Path(a.run))  # fail here, not once per seed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    results = []
    for seed in parse_seeds(a.seeds):
        done = out / f"rloo-seed{seed}.json"
        if not done.is_file():
            print(f"== seed {seed} (log: {out / f'rloo-seed{seed}.log'})", flush=True)
            with open(out / f"rloo-seed{seed}.log", "w", encoding="utf-8") as log:
                rc = subprocess.run(worker_command(a, seed), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO).returncode
            if rc or not done.is_file():
                print(f"   seed {seed} failed (exit {rc}); see {out / f'rloo-seed{seed}.log'}", flush=True)
                continue
        r = json.loads(done.read_text())
        if r.get("study") != study_key(a):
            raise SystemExit(f"{done} was run with other settings ({r.get('study')}); use another --out")
        results.append(r)
        print(f"   greedy {r['greedy_before']:.2f} -> {r['greedy_after']:.2f}, sampled {r['sampled_before']:.2f} -> "
              f"{r['sampled_after']:.2f}, KL {fmt(r['kl'], '.2f')}, {r['train_seconds']:.0f} s", flush=True)
    if not results:
        print("no seed finished", file=sys.stderr)
        return 1
    ours = read_ours(Path(a.ours)) if a.ours else None
    text = (f"Command: `python scripts/bench_rloo.py {' '.join(sys.argv[1:])}`\n\n" + settings_line(results[0])
            + "\n" + table(results, ours, a.lift) + "\n" + time_split(results)
            + ("" if ours is not None else reference_line(Path(a.run))))
    (out / "rloo.md").write_text(text)
    print("\n" + text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished pipeline run folder (sft/, reward/, data/, ppo/); "
                                                 "read only")
    ap.add_argument("--seeds", default="0-4", help="e.g. 0-4, 0,3,7 or 0-2,9")
    ap.add_argument("--out", required=True, help="study folder: rloo-seed{S}.json and .log, rloo.md")
    ap.add_argument("--ours", help="a `scripts/seed_study.py ppo` folder (study.json) to put beside RLOO")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an RLOOConfig field (repeatable), e.g. beta=0.05, num_generations=8")
    ap.add_argument("--episodes", type=int, default=0, help="total completions (default: our total_episodes)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per seed")
    ap.add_argument("--reward-scale", choices=["heldout", "raw"], default="heldout",
                    help="reward-model scores divided by their held-out std (as our PPO) or as trained")
    ap.add_argument("--missing-eos-penalty", type=float, default=None,
                    help="subtracted from the reward of an answer without a stop token (default: our PPO's)")
    ap.add_argument("--lift", type=float, default=0.30, help="agreement lift a seed must clear")
    ap.add_argument("--worker-seed", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.missing_eos_penalty is None:
        a.missing_eos_penalty = float(read_ppo_settings(Path(a.run)).get("missing_eos_penalty", 1.0))
    return worker(a, a.worker_seed) if a.worker_seed is not None else study(a)


if __name__ == "__main__":
    sys.exit(main())
