"""`rlhf sft`: supervised warm start with TRL's SFTTrainer on the `sft` split.

The split is in TRL's conversational prompt/completion format, so the loss covers the assistant's
answer only. Full fine-tuning (needed for the tiny model, whose weights start random) or LoRA.
The saved folder (full weights, or a LoRA adapter on its base) is what the next stages load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.chips.advice import AdviceParseError, action_token_index, parse_advice
from rlhf.config import SEED, field
from rlhf.data.schema import SFT_COLUMNS, load_rows, model_context, resolve_split
from rlhf.io import write_metrics
from rlhf.models import ModelOptions, add_lora, load_causal_lm, load_tokenizer, make_adapter_relocatable
from rlhf.models.chatml import IM_END
from rlhf.models.load import check_train_layers, train_last_layers
from rlhf.training import (
    GRADIENT_CHECKPOINTING_HELP,
    balanced_trainer,
    precision_args,
    quiet_transformers,
    seed_everything,
    world_info,
)


@dataclass
class SFTStageConfig(ModelOptions):
    model: str = field("runs/tiny-model", help="base model: folder, .gguf, short name or Hub id")
    data: str = field("runs/data", help="folder from `rlhf data preference` (sft.jsonl, test.jsonl) or a .jsonl")
    output_dir: str = field("runs/sft", help="where the SFT model and metrics.json go")
    seed: int = field(0, help="seed for weights init order, shuffling and evaluation sampling", **SEED)
    num_train_epochs: float = field(3.0, help="passes over the SFT split", gt=0)
    max_steps: int = field(-1, help="stop after this many optimizer steps (-1: use epochs)", min=-1)
    learning_rate: float = field(2e-4, help="peak learning rate", gt=0)
    per_device_train_batch_size: int = field(16, help="batch per process", min=1)
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step", min=1)
    warmup_steps: int = field(10, help="linear warm-up steps", min=0)
    max_length: int = field(256, help="longest prompt+answer in tokens", min=1)
    eval_prompts: int = field(200, help="held-out prompts (test split) for agreement after SFT; 0 skips", min=0)
    max_new_tokens: int = field(48, help="answer length budget during evaluation", min=1)
    logging_steps: int = field(10, help="log every N steps", min=1)
    gradient_checkpointing: bool = field(False, help=GRADIENT_CHECKPOINTING_HELP)
    train_layers: int = field(0, min=0, help="with use_lora false: train only the last N transformer layers and the "
                              "final norm (0: all weights); SmolLM2, last 10 of 30: 2.9 s per step of 8, all: 7.7 s")
    action_loss_weight: float = field(1.0, help="loss weight of the one answer token that picks the action (the "
                                      "rest is format, learned in ~30 steps); SmolLM2, balanced batches, step 80: "
                                      "action accuracy 0.63 with 10, 0.37 with 1", gt=0)
    balance_actions: bool = field(False, help="batches that hold each answer's action equally (use a batch size "
                                  "that is a multiple of 3): a pretrained model then learns the rule, not the "
                                  "batch's mix (SmolLM2: 0.65 vs 0.35 action accuracy after 80 steps)")

    def validate(self) -> None:
        check_train_layers("sft", self.train_layers, self.use_lora)


def run(cfg: SFTStageConfig) -> dict[str, Any]:
    quiet_transformers()
    seed_everything(cfg.seed)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    start = time.time()
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, padding_side="right")
    model = load_causal_lm(cfg.model, cfg)
    path = resolve_split(cfg.data, "sft")
    rows = load_rows(path, SFT_COLUMNS, tokenizer=tok, max_length=min(cfg.max_length, model_context(tok, model.config)))
    train = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    if cfg.use_lora:
        model = add_lora(model, cfg)
    elif cfg.train_layers:
        train_last_layers(model, cfg.train_layers)
    args = SFTConfig(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_length=cfg.max_length,
        logging_steps=cfg.logging_steps, save_strategy="no", report_to="none", **precision_args(cfg.dtype),
        gradient_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0, eos_token=IM_END if IM_END in tok.get_vocab() else None,
        disable_tqdm=False)
    trainer_cls = SFTTrainer
    if cfg.action_loss_weight != 1.0:
        trainer_cls = action_weighted_trainer(trainer_cls, tok, cfg.action_loss_weight)
    if cfg.balance_actions:
        trainer_cls = balanced_trainer(trainer_cls, _actions(rows), cfg.seed)
    trainer = trainer_cls(model=model, args=args, train_dataset=train, processing_class=tok)
    result = trainer.train()
    train_seconds = time.time() - start
    world = world_info()
    metrics: dict[str, Any] = {"train_loss": result.training_loss, "train_rows": len(rows), "steps": result.global_step,
                               "train_seconds": round(train_seconds, 2), **world,
                               "global_batch": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                               * world["world_size"]}
    if trainer.accelerator.is_main_process:
        out = Path(cfg.output_dir)
        trainer.save_model(str(out))
        make_adapter_relocatable(out)  # full weights, or the LoRA adapter (its base path is recorded)
        tok.padding_side = "left"
        tok.save_pretrained(out)
        if cfg.eval_prompts > 0:
            metrics.update(_evaluate(trainer.model, tok, cfg))
        metrics["wall_seconds"] = round(time.time() - start, 2)
        write_metrics(out, metrics)
        nan = float("nan")
        print(f"SFT done: loss {metrics['train_loss']:.3f}, agreement {metrics.get('agreement_greedy', nan):.3f}, "
              f"json {metrics.get('json_valid_greedy', nan):.3f} -> {out}")
    return metrics


def action_weights(labels: torch.Tensor, piece: Callable[[int], str], weight: float) -> torch.Tensor:
    """Per-token loss weights [B, T] for `labels` (-100 outside the answer): 1 on answer tokens,
    `weight` on the token where the action word begins, 0 elsewhere."""
    weights = (labels != -100).float()
    for row in range(labels.shape[0]):
        where = torch.nonzero(labels[row] != -100).flatten()
        at = action_token_index([piece(int(t)) for t in labels[row, where]]) if len(where) else None
        if at is not None:
            weights[row, where[at]] = weight
    return weights


def action_weighted_trainer(trainer_cls: type, tok: Any, weight: float) -> type:
    """`trainer_cls` (TRL's SFTTrainer) whose token loss weighs the action token by `weight`."""
    pieces: dict[int, str] = {}

    def piece(token: int) -> str:
        if token not in pieces:
            pieces[token] = tok.decode([token])
        return pieces[token]

    class ActionWeighted(trainer_cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs["labels"][:, 1:]  # the token each position predicts
            out = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            logits = out.logits[:, :-1].float()
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0),
                                                          reduction="none")
            count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
            loss = (per_token * action_weights(labels, piece, weight)).sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients
            return (loss, out) if return_outputs else loss

    return ActionWeighted


def _actions(rows: list[dict[str, Any]]) -> list[str | None]:
    """Each row's answer action (None where the answer is not advice: a group of its own)."""
    out: list[str | None] = []
    for r in rows:
        try:
            out.append(parse_advice(r["completion"][-1]["content"]).action)
        except AdviceParseError:
            out.append(None)
    return out


def _evaluate(model: Any, tok: Any, cfg: SFTStageConfig) -> dict[str, Any]:
    from rlhf.generation import evaluate_model
    from rlhf.io import read_jsonl

    test = read_jsonl(resolve_split(cfg.data, "test"))[: cfg.eval_prompts]
    prompts = [r["prompt"] for r in test]
    greedy = evaluate_model(model, tok, prompts, modes=("greedy",), max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed)["greedy"]
    return {"agreement_greedy": greedy["agreement"], "json_valid_greedy": greedy["json_valid"],
            "action_share_greedy": greedy["action_share"], "samples": greedy["samples"]}
