"""The stages of rlhf, named once: every `rlhf` subcommand and the pipeline's stages in their order.

The CLI reads STAGES for its dispatch and `rlhf --help`, the pipeline reads PIPELINE for what runs,
in which order, from which YAML section into which folder, and report.md reads PIPELINE for the order
of its table. Modules are named here, not imported, so `rlhf --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple


class Command(NamedTuple):
    """An `rlhf` subcommand: its module, config dataclass and run function, and its line in `rlhf --help`."""

    module: str
    config: str
    run: str
    summary: str


class PipelineStage(NamedTuple):
    """A pipeline stage: the `rlhf` subcommand it runs, its section of the pipeline YAML, its run sub-folder."""

    command: str
    section: str
    folder: str


# stage words -> (module, config class, run function, one-line summary)
STAGES: dict[str, Command] = {
    "data preference": Command("rlhf.data.preference", "PreferenceConfig", "run",
                               "chip-advice preference pairs (+ SFT split) from the rule or an Ollama teacher"),
    "data tabular": Command("rlhf.data.tabular", "TabularDataConfig", "run",
                            "the seed's CSVs: dims (length,width,height,action) or env (chip PPO dataset)"),
    "tiny-model": Command("rlhf.models.tiny", "TinyModelConfig", "run",
                          "build a tiny Qwen2 model + tokenizer offline (tests, demo)"),
    "sft": Command("rlhf.sft", "SFTStageConfig", "run", "supervised warm start with TRL's SFTTrainer"),
    "reward": Command("rlhf.reward", "RewardConfig", "run",
                      "Bradley-Terry reward model (scalar head), TRL's RewardTrainer"),
    "score": Command("rlhf.reward", "ScoreConfig", "run_score", "print reward-model scores for prompt/response pairs"),
    "ppo": Command("rlhf.ppo.trainer", "PPOConfig", "run",
                   "PPO on a LoRA policy with value model, reference and KL penalty"),
    "eval": Command("rlhf.evaluate", "EvalConfig", "run",
                    "compare models on held-out chips: agreement, JSON, reward, KL"),
    "export": Command("rlhf.export", "ExportConfig", "run",
                      "merge LoRA, write GGUF + Modelfile, optionally push to Ollama"),
    "tabular train": Command("rlhf.tabular.classifier", "TabularTrainConfig", "run_train",
                             "train the tabular action classifier"),
    "tabular predict": Command("rlhf.tabular.classifier", "TabularPredictConfig", "run_predict",
                               "predict an action for a chip"),
    "gym train": Command("rlhf.gym.train", "GymTrainConfig", "run_train",
                         "stable-baselines3 PPO on the chip environment"),
    "gym eval": Command("rlhf.gym.train", "GymEvalConfig", "run_eval",
                        "evaluate a gym agent against random and oracle"),
    "pipeline": Command("rlhf.pipeline", "PipelineConfig", "run",
                        "data -> SFT -> reward -> PPO -> eval -> export, resumable"),
}

# pipeline stage -> (`rlhf` stage it runs, YAML section, run sub-folder), in the order they run
PIPELINE: dict[str, PipelineStage] = {
    "base": PipelineStage("tiny-model", "tiny_model", "base"),
    "data": PipelineStage("data preference", "data", "data"),
    "sft": PipelineStage("sft", "sft", "sft"),
    "reward": PipelineStage("reward", "reward", "reward"),
    "ppo": PipelineStage("ppo", "ppo", "ppo"),
    "eval": PipelineStage("eval", "eval", "eval"),
    "export": PipelineStage("export", "export", "export"),
}


def load_stage(name: str) -> tuple[type, Any, str]:
    """The config class, run function and module docstring (its `--help` text) of `rlhf <name>`."""
    module_name, cfg_name, fn_name, _ = STAGES[name]
    module = importlib.import_module(module_name)
    return getattr(module, cfg_name), getattr(module, fn_name), module.__doc__ or ""
