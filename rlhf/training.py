"""Small pieces the Trainer-based stages (SFT, reward) share."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from rlhf.models.precision import resolve_dtype

# One text for the SFT and reward stages' `gradient_checkpointing` key (both default to false).
GRADIENT_CHECKPOINTING_HELP = ("recompute activations in the backward pass: less memory, more compute. TRL turns "
                               "it on by default; with LoRA it also sends the backward through every layer "
                               "(measured: 3x slower steps on SmolLM2)")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to `n` for a block, and given back after it: a library call must
    not leave the next stage in the same process (a test suite, the pipeline) with fewer threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_transformers() -> None:
    """Keep the terminal readable: our own progress bars, not one per weight file."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    # Deprecation notices of our dependencies, not actionable by a user of rlhf.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate)\b")
    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator is found.*")
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
    # peft, when an adapter's base is another adapter folder (LoRA PPO on a LoRA SFT): harmless
    warnings.filterwarnings("ignore", message="Could not find a config file in .* vocabulary was not modified")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # datasets, quiet when a stage imports it, without importing it here: it pulls in pandas and
    # pyarrow (measured: PPO on the tiny bench model peaked at 544 MB with the import, 457 MB without;
    # PPO never uses datasets)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if "datasets" in sys.modules:  # already imported: its settings were read at import
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].utils.logging.set_verbosity_error()


def precision_args(dtype: str) -> dict[str, Any]:
    """TrainingArguments for a model loaded in `dtype` (`auto` resolved by rlhf.models.precision):
    autocast in bf16/fp16. Without a GPU, transformers refuses bf16 unless told it runs on CPU."""
    dtype = resolve_dtype(dtype)
    half = dtype in ("bfloat16", "float16")
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16",
            "use_cpu": half and not torch.cuda.is_available()}


def world_info() -> dict[str, Any]:
    """World size as torchrun/accelerate set it (1 for a plain `python` run)."""
    return {"world_size": int(os.environ.get("WORLD_SIZE", "1")), "rank": int(os.environ.get("RANK", "0"))}


def use_cpu_backend_when_no_gpu() -> None:
    """Under torchrun on a machine without a GPU, accelerate only joins the gloo process group when
    told it runs on CPU; otherwise each process silently trains alone (measured: world size 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "ACCELERATE_USE_CPU" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"


class BalancedSampler(torch.utils.data.Sampler[int]):
    """Row order in which the groups (the teacher's actions) take turns: with a batch size that is a
    multiple of the number of groups, every batch holds each group equally (until the smaller groups
    run out near the end of an epoch). A random batch's mix of actions is noise that moves the action
    token's bias from batch to batch; measured on SmolLM2 (SFT, last 10 layers, lr 1e-4), random
    batches of 8 swung every answer between "increase" and "decrease" for 120 steps (held-out
    action accuracy 0.35-0.41), while balanced batches of 9 reached 0.59 at step 40 and 0.65 at 80.
    Each epoch shuffles within the groups anew (seed + epoch): the same seed gives the same order."""

    def __init__(self, groups: list[Any], seed: int) -> None:
        self.groups, self.seed, self.epoch = groups, seed, 0
        by_group: dict[Any, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        self._by_group = [by_group[g] for g in sorted(by_group, key=str)]

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        queues = [[rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()] for rows in self._by_group]
        for turn in range(max(map(len, queues))):
            for q in queues:
                if turn < len(q):
                    yield q[turn]


def balanced_trainer(trainer_cls: type, groups: list[Any], seed: int) -> type:
    """`trainer_cls` (a transformers Trainer) that draws its training rows in BalancedSampler order."""

    class Balanced(trainer_cls):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler[int]:
            return BalancedSampler(groups, seed)

    Balanced.__name__ = f"Balanced{trainer_cls.__name__}"
    return Balanced
