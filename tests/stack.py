"""A small, fast model stack for tests: tiny Qwen2 (hidden 32) -> rule data -> SFT -> reward model.

Built once per test session (see the `tiny_stack` fixture) with the stages' own run functions, so
the tests exercise the same code a user runs."""

from __future__ import annotations

from pathlib import Path

from rlhf.config import build
from rlhf.data.preference import PreferenceConfig
from rlhf.data.preference import run as run_data
from rlhf.models.tiny import build_tiny_model
from rlhf.reward import RewardConfig
from rlhf.reward import run as run_reward
from rlhf.sft import SFTStageConfig
from rlhf.sft import run as run_sft

TINY_SIZES = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def build_stack(root: Path) -> dict[str, str]:
    base = build_tiny_model(root / "base", seed=0, **TINY_SIZES)
    data = root / "data"
    run_data(build(PreferenceConfig, {"teacher": "rule", "n": 120, "seed": 0, "output_dir": str(data),
                                      "sft_n": 120, "sft_label_noise": 1.0}, "test"))
    sft = root / "sft"
    run_sft(build(SFTStageConfig, {"model": str(base), "data": str(data), "output_dir": str(sft), "use_lora": False,
                                   "learning_rate": 3e-3, "max_steps": 20, "per_device_train_batch_size": 16,
                                   "eval_prompts": 8, "logging_steps": 100}, "test"))
    reward = root / "reward"
    run_reward(build(RewardConfig, {"model": str(sft), "data": str(data), "output_dir": str(reward), "use_lora": False,
                                    "learning_rate": 1e-3, "max_steps": 20, "per_device_train_batch_size": 16,
                                    "logging_steps": 100}, "test"))
    return {"base": str(base), "data": str(data), "sft": str(sft), "reward": str(reward)}
