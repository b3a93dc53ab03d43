"""`rlhf reward`: the Bradley-Terry reward model, and `rlhf score` to probe it.

The seed's recipe: the LM head is replaced by a scalar head (AutoModelForSequenceClassification,
one label) on the same base, trained on chosen/rejected pairs with
    loss = -log sigmoid(r_chosen - r_rejected [- margin]) [+ c * (r_chosen + r_rejected)^2]
through TRL's RewardTrainer. Full fine-tuning or LoRA (the score head is always trained).
The stage also writes the held-out scale (`reward_normalization.json`) that standardises the scores;
scoring with a trained model, here as everywhere, goes through `rlhf.rewards.model`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.config import SEED, field
from rlhf.data.schema import PREFERENCE_COLUMNS, check_messages, load_rows, model_context, resolve_split
from rlhf.errors import UserError
from rlhf.io import atomic_write_json, read_jsonl, write_metrics
from rlhf.models import ModelOptions, add_lora, load_tokenizer, load_value_model, make_adapter_relocatable
from rlhf.rewards.model import NORMALIZATION_FILE, ModelReward, score_texts
from rlhf.training import GRADIENT_CHECKPOINTING_HELP, precision_args, quiet_transformers, seed_everything, world_info


def write_normalization(model_dir: Path, metrics: dict[str, Any]) -> None:
    """The scale of the rewards on held-out answers (chosen and rejected pooled): PPO divides by it so
    that its KL coefficient means the same whatever scale Bradley-Terry happened to learn."""
    pooled_mean = (metrics["reward_chosen_mean"] + metrics["reward_rejected_mean"]) / 2
    pooled_var = ((metrics["reward_chosen_std"] ** 2 + metrics["reward_rejected_std"] ** 2) / 2
                  + (metrics["reward_chosen_mean"] - pooled_mean) ** 2)
    atomic_write_json(model_dir / NORMALIZATION_FILE, {"mean": pooled_mean, "std": math.sqrt(pooled_var)})


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coef: float | None = None) -> torch.Tensor:
    """The loss RewardTrainer minimises, written out so it can be checked by hand."""
    import torch.nn.functional as F

    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


@dataclass
class RewardConfig(ModelOptions):
    model: str = field("runs/sft", help="base of the reward model (usually the SFT model)")
    data: str = field("runs/data", help="folder from `rlhf data preference` (train.jsonl, test.jsonl) or a .jsonl")
    output_dir: str = field("runs/reward", help="where the reward model and metrics.json go")
    seed: int = field(0, help="seed of the score head init and shuffling", **SEED)
    num_train_epochs: float = field(4.0, help="passes over the training pairs", gt=0)
    max_steps: int = field(-1, help="stop after this many optimizer steps (-1: use epochs)", min=-1)
    learning_rate: float = field(1e-4, help="peak learning rate", gt=0)
    per_device_train_batch_size: int = field(16, help="pairs per process per micro-batch", min=1)
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step", min=1)
    warmup_steps: int = field(10, help="linear warm-up steps", min=0)
    max_length: int = field(256, help="longest prompt+answer in tokens", min=1)
    margin: float = field(0.0, help="constant margin in -log sigmoid(r_c - r_r - margin)")
    center_rewards_coefficient: float = field(0.0, help="pull rewards toward zero mean (Eisenstein et al.); 0 = off",
                                              min=0)
    eval_batch_size: int = field(64, help="pairs per batch when scoring the held-out split", min=1)
    logging_steps: int = field(10, help="log every N steps", min=1)
    gradient_checkpointing: bool = field(False, help=GRADIENT_CHECKPOINTING_HELP)


def evaluate_pairs(model: Any, tok: Any, rows: list[dict[str, Any]], batch_size: int = 64) -> dict[str, Any]:
    chosen = score_texts(model, tok, [r["prompt"] + r["chosen"] for r in rows], batch_size)
    rejected = score_texts(model, tok, [r["prompt"] + r["rejected"] for r in rows], batch_size)
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    by_strategy: dict[str, list[bool]] = defaultdict(list)
    for row, wins in zip(rows, (c > r).tolist()):
        by_strategy[row.get("rejection_strategy", "unknown")].append(wins)
    return {
        "eval_accuracy": float((c > r).float().mean()),
        "eval_margin": float((c - r).mean()),
        "eval_loss": float(bradley_terry_loss(c, r)),
        "reward_chosen_mean": float(c.mean()), "reward_chosen_std": float(c.std()),
        "reward_rejected_mean": float(r.mean()), "reward_rejected_std": float(r.std()),
        "accuracy_by_strategy": {k: sum(v) / len(v) for k, v in sorted(by_strategy.items())},
        "eval_pairs": len(rows),
    }


def action_ranking_accuracy(model: Any, tok: Any, rows: list[dict[str, Any]], batch_size: int = 64) -> float | None:
    """Share of held-out chips where the reward model scores the teacher's action above both other
    actions (each written with its own rule reason): the best agreement PPO can reach by
    maximising this reward model."""
    from rlhf.chips import ACTIONS, format_advice, rule_reason

    rows = [r for r in rows if r.get("teacher_action") in ACTIONS]
    if not rows:
        return None
    lang = ["zh" if any("\u4e00" <= ch <= "\u9fff" for ch in r["prompt"][-1]["content"]) else "en" for r in rows]
    scores = torch.tensor([score_texts(model, tok, [r["prompt"] + [{"role": "assistant", "content":
                                                                    format_advice(a, rule_reason(a, g))}]
                                                    for r, g in zip(rows, lang)], batch_size) for a in ACTIONS]).T
    truth = torch.tensor([ACTIONS.index(r["teacher_action"]) for r in rows])
    return int((scores.argmax(1) == truth).sum()) / len(truth)  # an exact fraction, not a float32


def run(cfg: RewardConfig) -> dict[str, Any]:
    quiet_transformers()
    seed_everything(cfg.seed)
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    start = time.time()
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, padding_side="right")
    model = load_value_model(cfg.model, cfg, pad_token_id=tok.pad_token_id)
    context = min(cfg.max_length, model_context(tok, model.config))
    train_rows = load_rows(resolve_split(cfg.data, "train"), PREFERENCE_COLUMNS, tokenizer=tok, max_length=context)
    test_rows = load_rows(resolve_split(cfg.data, "test"), PREFERENCE_COLUMNS, tokenizer=tok, max_length=context)
    keep = list(PREFERENCE_COLUMNS) + (["margin"] if cfg.margin else [])
    margin = {"margin": cfg.margin} if cfg.margin else {}
    train = Dataset.from_list([{**{k: r[k] for k in PREFERENCE_COLUMNS}, **margin} for r in train_rows])
    train = train.select_columns(keep)
    if cfg.use_lora:
        model = add_lora(model, cfg, task_type="SEQ_CLS")
    args = TRLRewardConfig(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None, logging_steps=cfg.logging_steps,
        save_strategy="no", report_to="none", **precision_args(cfg.dtype),
        gradient_checkpointing=cfg.gradient_checkpointing, dataloader_num_workers=0,
        disable_dropout=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    result = trainer.train()
    train_seconds = time.time() - start
    if not math.isfinite(result.training_loss):
        raise UserError("reward training diverged (non-finite loss); lower --learning_rate")
    metrics: dict[str, Any] = {"train_loss": result.training_loss, "train_pairs": len(train_rows),
                               "steps": result.global_step, "train_seconds": round(train_seconds, 2),
                               "global_batch": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                               * world_info()["world_size"], **world_info()}
    if trainer.accelerator.is_main_process:
        out = Path(cfg.output_dir)
        trainer.save_model(str(out))
        make_adapter_relocatable(out)
        tok.padding_side = "left"
        tok.save_pretrained(out)
        metrics.update(evaluate_pairs(trainer.model, tok, test_rows, cfg.eval_batch_size))
        metrics["eval_action_ranking_accuracy"] = action_ranking_accuracy(trainer.model, tok, test_rows,
                                                                          cfg.eval_batch_size)
        write_normalization(out, metrics)
        metrics["wall_seconds"] = round(time.time() - start, 2)
        write_metrics(out, metrics)
        ranking = metrics["eval_action_ranking_accuracy"]
        ranking_text = "n/a" if ranking is None else f"{ranking:.2f}"
        print(f"reward model: held-out pair accuracy {metrics['eval_accuracy']:.3f} "
              f"(margin {metrics['eval_margin']:.2f}) on {len(test_rows)} pairs, ranks the teacher's action "
              f"first on {ranking_text} of chips, world size {metrics['world_size']}, "
              f"{metrics['wall_seconds']:.0f} s -> {out}")
    return metrics


@dataclass
class ScoreConfig:
    model: str = field("runs/reward", help="reward model folder")
    prompt: str = field("", help="user prompt (with --response)")
    response: str = field("", help="assistant answer to score")
    file: str = field("", help="JSONL with prompt/response (strings) or prompt/chosen/rejected (messages)")
    output_dir: str = field("", help="if set, write metrics.json (with every score) here")
    seed: int = field(0, help="unused; kept for the common convention", **SEED)
    batch_size: int = field(64, help="rows per batch", min=1)


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    items: list[tuple[str, list[dict[str, str]]]] = []  # read before the model loads: a bad file fails fast
    if cfg.file:
        for line, row in enumerate(read_jsonl(cfg.file), start=1):
            prompt = row.get("prompt")
            answers = [(k, row[k]) for k in ("response", "chosen", "rejected") if k in row]
            if not answers or not prompt:
                raise UserError(f"{cfg.file}: row {line}: needs 'prompt' and 'response' (or 'chosen'/'rejected')")
            for key, value in [("prompt", prompt), *answers]:
                if isinstance(value, list):
                    check_messages(value, Path(cfg.file), line, key)
                elif not isinstance(value, str):
                    raise UserError(f"{cfg.file}: row {line}: '{key}' must be a string or a list of messages, "
                                    f"got {type(value).__name__}")
            user = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            for key, ans in answers:
                msgs = ans if isinstance(ans, list) else [{"role": "assistant", "content": ans}]
                items.append((f"row {line} {key}", user + msgs))
        if not items:
            raise UserError(f"{cfg.file}: no rows; write one JSON object per line with 'prompt' and 'response'")
    elif cfg.prompt and cfg.response:
        items.append(("", [{"role": "user", "content": cfg.prompt}, {"role": "assistant", "content": cfg.response}]))
    else:
        raise UserError("pass --prompt TEXT --response TEXT, or --file FILE.jsonl")
    quiet_transformers()
    scorer = ModelReward(cfg.model, batch_size=cfg.batch_size, normalize=False, flag="--model")
    scores = scorer.conversations([c for _, c in items])
    for (label, conv), s in zip(items, scores):
        print(f"{s:+.4f}  {label}  {conv[-1]['content'][:100]}".replace("  ", " ", 1 if not label else 0))
    metrics = {"n": len(scores), "mean": sum(scores) / len(scores), "scores": scores}
    if cfg.output_dir:
        write_metrics(cfg.output_dir, metrics)
    return metrics
