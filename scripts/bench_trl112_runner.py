#!/usr/bin/env python
"""TRL 1.12's PPO on a bench model folder, measured; the TRL half of `scripts/bench_ppo_vs_trl.py`.

Runs inside a separate venv with trl==1.12.0 (the last TRL with PPO), so it imports nothing from `rlhf`.
The model folder holds `policy/`, `reward/` (value model starts from it, as TRL does) and `prompts.jsonl`
(rows with a `messages` list). Writes one JSON object to --json-out:

    python bench_trl112_runner.py --model-dir ../shared/bench/tiny_qwen --gc-freeze --json-out trl.json

Generation is timed by wrapping trl's module-level `batch_generation` (timing and token counting only; the
trainer's behaviour is unchanged). `--gc-freeze` is the fair anchor: TRL 1.12 calls gc.collect() twice per
update, and with ~400k objects tracked after imports each call costs ~0.2 s, which dominates tiny models.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


class TimedGeneration:
    """Stands in for trl's `batch_generation`: counts the response tokens kept (up to and including the
    first eos, as TRL's truncation keeps them) and the seconds spent generating."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id
        self.inner = trl_ppo.batch_generation
        self.seconds = 0.0
        self.tokens = 0
        self.slots = 0

    def __call__(self, model: Any, queries: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        query_responses, logits = self.inner(model, queries, *args, **kwargs)
        self.seconds += time.perf_counter() - t
        resp = query_responses[:, queries.shape[1]:]
        self.slots += resp.numel()
        is_eos = resp == self.eos_id
        kept = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(resp[:, 0], resp.shape[1]))
        self.tokens += int(kept.sum())
        return query_responses, logits


class KeepLogs(TrainerCallback):
    """TRL logs one dict per update (logging_steps=1); keep the ones with PPO objectives."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "objective/scores" in logs:
            self.rows.append(dict(logs))


def window_mean(rows: list[dict[str, float]], key: str, head: bool) -> float:
    """Mean over the first or last k updates (k = a quarter of them, at most 4): one update is noisy."""
    k = max(1, min(4, len(rows) // 4))
    part = rows[:k] if head else rows[-k:]
    return sum(r[key] for r in part) / len(part)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    add_bench_settings(ap)
    ap.add_argument("--num-mini-batches", type=int, default=1)
    ap.add_argument("--stop-token", choices=["eos", "none"], default="eos")
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the policy (0: full fine-tuning)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gc-freeze", action="store_true", help="gc.collect(); gc.freeze() right before train()")
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    policy_dir = os.path.join(args.model_dir, "policy")
    reward_dir = os.path.join(args.model_dir, "reward")
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    with open(os.path.join(args.model_dir, "prompts.jsonl"), encoding="utf-8") as f:
        messages = [json.loads(line)["messages"] for line in f if line.strip()]
    # TRL's PPO wants token ids of the prompt, chat template with the generation prompt appended
    ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in ids]
    dataset = Dataset.from_dict({"input_ids": ids})

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    # with LoRA the reference is the policy with its adapter disabled: no second copy
    ref = None if args.lora_r else AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules="all-linear")

    out_dir = tempfile.mkdtemp(prefix="bench-trl112-")
    cfg = PPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=args.num_mini_batches, num_ppo_epochs=args.ppo_epochs,
        response_length=args.response_length, total_episodes=args.episodes,
        local_rollout_forward_batch_size=args.batch_size, learning_rate=args.lr, kl_coef=args.kl_coef,
        temperature=args.temperature, stop_token="eos" if args.stop_token == "eos" else None,
        num_sample_generations=0, logging_steps=1, save_strategy="no", report_to="none", bf16=False, fp16=False,
        use_cpu=True, seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    timed = TimedGeneration(tok.eos_token_id)
    trl_ppo.batch_generation = timed
    logs = KeepLogs()
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, callbacks=[logs], peft_config=peft_config)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(out_dir, ignore_errors=True)

    episodes = cfg.num_total_batches * cfg.batch_size
    rows = logs.rows
    result = {
        "side": "trl112" + ("-gcfreeze" if args.gc_freeze else "-stock"),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "updates": cfg.num_total_batches,
        "episodes": episodes,
        "train_seconds": round(train_s, 3),
        "train_cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
        "episodes_per_second": episodes / train_s,
        "tokens": timed.tokens,
        "tokens_per_second": timed.tokens / train_s,
        "generate_seconds": round(timed.seconds, 3),
        "generated_slots": timed.slots,
        "score_start": window_mean(rows, "objective/scores", head=True),
        "score_end": window_mean(rows, "objective/scores", head=False),
        "kl_start": window_mean(rows, "objective/kl", head=True),
        "kl_end": window_mean(rows, "objective/kl", head=False),
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "process_seconds": round(time.perf_counter() - t_start, 2),
    }
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
