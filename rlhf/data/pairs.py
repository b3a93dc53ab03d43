"""The rows of `rlhf data preference`: the chip stream, each chip's own RNG, its split and its row.

A chip's split, rejection strategy and SFT noise come from an RNG seeded by (seed, chip), so a row
depends only on its chip and on the rows before it: what keeps a resumed run byte-identical.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rlhf.chips import ACTIONS, DIM_MAX, DIM_MIN, Advice, ChipSpec, dims_prompt, format_advice, rule_reason
from rlhf.data.rejections import make_rejected, weighted_strategy

if TYPE_CHECKING:
    from rlhf.data.preference import PreferenceConfig

SPLITS = ("train", "test", "sft")


def spec_stream(seed: int) -> Iterator[ChipSpec]:
    """Distinct chips, uniformly drawn; the same sequence as `sample_specs(n, seed)` for any n.

    Lazy rather than `sample_specs`' list: how many chips a run draws depends on how many the
    teacher skips, which is known only as the answers come in."""
    rng = random.Random(seed)
    seen: set[ChipSpec] = set()
    universe = (DIM_MAX - DIM_MIN + 1) ** 3
    while len(seen) < universe:
        spec = ChipSpec(rng.randint(DIM_MIN, DIM_MAX), rng.randint(DIM_MIN, DIM_MAX), rng.randint(DIM_MIN, DIM_MAX))
        if spec not in seen:
            seen.add(spec)
            yield spec


def chip_rng(seed: int, spec: ChipSpec) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
    return random.Random(f"{seed}:{spec.key()}")


def choose_split(u: float, need: dict[str, int]) -> str:
    """Splits fill in proportion to what each still needs, so all of them finish together."""
    total = sum(need.values())
    acc = 0.0
    for split in SPLITS:
        acc += need[split] / total
        if u < acc and need[split] > 0:
            return split
    return next(s for s in reversed(SPLITS) if need[s] > 0)


def build_row(split: str, spec: ChipSpec, advice: Advice, rng: random.Random, cfg: PreferenceConfig,
              teacher_model: str) -> dict[str, Any]:
    prompt = [{"role": "user", "content": dims_prompt(spec, cfg.language)}]
    dims = {"length": spec.length, "width": spec.width, "height": spec.height}
    if split == "sft":
        keep = rng.random() >= cfg.sft_label_noise
        sft_action = advice.action if keep else rng.choice(ACTIONS)
        # A kept action keeps the teacher's own reason; another action gets its plausible reason.
        reason = advice.reason if sft_action == advice.action else rule_reason(sft_action, cfg.language)
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": format_advice(sft_action, reason)}],
                **dims, "teacher_action": advice.action, "sft_action": sft_action}
    strategy = weighted_strategy(rng, cfg.rejection_weights)
    chosen = format_advice(advice.action, advice.reason)
    rejected = make_rejected(strategy, advice.action, advice.reason, cfg.language, rng)
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **dims,
            "teacher_action": advice.action, "teacher_model": teacher_model, "rejection_strategy": strategy}
