"""PPOConfig: TRL 1.12's PPO field names where they apply, so a TRL user's config carries over."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from rlhf.config import SEED, field
from rlhf.errors import UserError
from rlhf.models import ModelOptions
from rlhf.models.load import check_train_layers
from rlhf.rewards import check_reward_weights

# Keys a resumed run may change: outputs, logging, checkpoint cadence, threading. Any other
# difference from the checkpoint's settings would silently mix two trainings.
NOT_TRAINING = frozenset({"output_dir", "resume", "overwrite", "log_every", "sample_every", "save_every",
                          "keep_checkpoints", "report_to", "eval_prompts", "eval_draws", "collapse_share",
                          "parallel_value", "gc_freeze"})


@dataclass
class PPOConfig(ModelOptions):
    # models and data
    model: str = field("runs/sft", help="policy to start from (usually the SFT model)")
    reward_model: str = field("runs/reward", help="reward model for the 'model' reward source")
    value_model: str = field("", help="start of the value model (default: the reward model, as in TRL)")
    value_head_init: Literal["zero", "reward"] = field(
        "zero", help="value head at start: 'zero' (reward model's backbone, head zeroed) or 'reward' (as TRL)")
    value_use_lora: bool = field(False, help="LoRA on the value model instead of training it fully")
    train_layers: int = field(0, min=0, help="with use_lora false: the policy trains only its last N transformer "
                              "layers and the final norm (0: all weights); the reference is a frozen copy")
    data: str = field("runs/data", help="preference folder: prompts from train.jsonl, held-out from test.jsonl")
    output_dir: str = field("runs/ppo", help="policy/, value/, checkpoints/, metrics.jsonl, metrics.json")
    seed: int = field(0, help="one seed for sampling, shuffling and init: same seed, same numbers on CPU", **SEED)
    rewards: dict = field({"model": 1.0}, help="weighted reward sources: model, rule, bonus, format, ollama")
    ollama_model: str = field("qwen2.5:7b", help="judge model for the 'ollama' reward source")
    ollama_host: str = field("", help="judge host(s), comma-separated (default $OLLAMA_HOST)")
    # rollout
    total_episodes: int = field(4096, help="prompts sampled over the run (updates = total_episodes / batch_size)",
                                min=1)
    batch_size: int = field(32, help="rollouts per update, over all processes", min=1)
    samples_per_prompt: int = field(
        1, min=1, help="answers sampled per prompt in a batch (batch_size / samples_per_prompt distinct prompts); "
                "with score_baseline 'group' each answer is scored against its siblings")
    response_length: int = field(32, help="max new tokens per response", min=1)
    temperature: float = field(0.7, help="sampling temperature (log-probs are taken at the same temperature)", gt=0,
                               why="PPO needs a stochastic policy")
    top_k: int = field(0, help="top-k sampling (0: off)", min=0)
    top_p: float = field(1.0, help="nucleus sampling", gt=0, max=1)
    stop_token: Literal["eos", "none"] = field(
        "eos", help="'eos': stop at <|im_end|>/EOS and mask what follows; 'none': fixed length")
    logprobs_from_generation: bool = field(
        False, help="take the sampled tokens' log-probs and entropies while sampling: one policy forward fewer "
                    "per update with several minibatches (with one, the rollout's forward is the first PPO "
                    "step's anyway, and this is ignored); equal to the forward's within 1e-5, but the demo's "
                    "seed 1 then learned +18 points instead of +51: training on this task is that sensitive")
    missing_eos_penalty: float = field(1.0, help="subtracted from the score of a response with no stop token", min=0)
    score_unfinished: Literal["closed", "open"] = field(
        "closed", help="a response cut off before its stop token, as the reward model sees it: 'closed' (the chat "
                       "template ends the turn; the penalty above marks the cut) or 'open' (tokens as generated, "
                       "the turn left open, as TRL scores)")
    # reward shaping
    kl_coef: float = field(0.2, help="beta in r_t = -beta*KL_t (+ score at the end); see configs for why 0.2", min=0)
    kl_estimator: Literal["k1", "k3"] = field("k1", help="per-token KL estimator")
    adaptive_kl: bool = field(False, help="adapt beta toward target_kl (Ziegler et al. 2019)")
    target_kl: float = field(1.0, help="target KL (nats per sequence) of the adaptive controller", gt=0)
    kl_horizon: int = field(10000, help="horizon of the adaptive controller (episodes)", min=1)
    whiten_rewards: bool = field(False, help="whiten per-token rewards before GAE")
    normalize_reward: bool = field(True, help="standardise reward-model scores by the reward stage's held-out stats")
    score_scale: float = field(1.0, help="multiply scores by this (bring a reward model's scale near 1)", gt=0)
    score_clip: float = field(0.0, help="clip scores to [-c, c] after scaling (0: off)", min=0)
    score_baseline: Literal["none", "batch", "group", "canonical"] = field(
        "none", help="baseline taken out of each score before GAE: 'none'; 'batch' (standardised over the "
                     "batch); 'group' (minus the mean of the other samples of the same prompt, RLOO's "
                     "leave-one-out; needs samples_per_prompt >= 2); 'canonical' (minus the mean score of "
                     "each action's canonical answer to the same chip: a per-chip baseline from one sample "
                     "per prompt; chip prompts only)")
    centre_actions: bool = field(
        False, help="after the score baseline, take out of each answer's score the batch's mean over the answers "
                    "with the same action (the answer-mix bonus is kept): what is left ranks an action's answers "
                    "against each other, by chip, so nothing pushes one action up everywhere, not even the luck "
                    "of which chips a batch gave which action; like action_offset_chips, it assumes each action "
                    "is right on about as many chips as another")
    answer_entropy_coef: float = field(
        0.0, min=0, help="bonus coef * -log(share of the answer's action in the batch), centred: ascends the entropy "
                  "of the batch's action mix, so no single answer takes over every prompt, while the policy "
                  "stays free to be sure per prompt (0: off)")
    action_offset_chips: int = field(
        0, min=0, help="before PPO, score each action's canonical answer on this many training chips and take each "
                       "action's mean lead over the chip's mean out of its answers' scores: a reward model that "
                       "prefers one action everywhere then gives no push toward that answer everywhere, only "
                       "toward what each chip decides; it assumes each action is right on about as many "
                       "training chips as another, as the rule teacher's 33/33/34% (0: off)")
    aux_value_coef: float = field(
        0.0, min=0, help="weight of an auxiliary value head on the policy's last hidden states, fitted to the returns "
                         "beside the clipped policy loss (PPG's auxiliary value head, Cobbe et al. 2021): its "
                         "gradient teaches the policy's own layers what decides the score, which the policy loss "
                         "alone builds slowly from a prompt-blind start (0: off). The head trains only; nothing "
                         "reads it, and policy/ is saved without it")
    # optimisation
    learning_rate: float = field(1e-4, help="AdamW learning rate (policy and value)", gt=0)
    lr_schedule: Literal["constant", "linear"] = field("linear", help="learning-rate schedule over updates")
    num_ppo_epochs: int = field(4, help="passes over each rollout batch", min=1)
    num_mini_batches: int = field(1, help="minibatches per PPO epoch", min=1)
    gradient_accumulation_steps: int = field(1, help="micro-batches per minibatch (memory)", min=1)
    cliprange: float = field(0.2, help="policy ratio clip", gt=0)
    cliprange_value: float = field(0.2, help="value clip", gt=0)
    vf_coef: float = field(0.1, help="value-loss coefficient", min=0)
    gamma: float = field(1.0, help="discount", min=0, max=1)
    lam: float = field(0.95, help="GAE lambda", min=0, max=1)
    max_grad_norm: float = field(1.0, help="per-model gradient-norm clip (0: off, as in TRL 1.12's PPO); with "
                                 "Adam, clipping spikes raises the typical step: see README, bench", min=0)
    early_stop_kl: float = field(0.0, help="stop an update's epochs when approx KL exceeds this (0: off)", min=0)
    early_stop_log_ratio: float = field(0.0, help="stop the policy's steps of an update once one response token's "
                                        "log-probability has moved more than this many nats from the rollout's "
                                        "(|log ratio|, max over a minibatch; 0: off)", min=0)
    early_stop_min_prob: float = field(0.0, help="only tokens the rollout sampled with at least this probability "
                                       "count toward early_stop_log_ratio (0: every token): a token the policy "
                                       "was sure of losing its mass breaks the format, while the token that "
                                       "picks an answer moving far is learning", min=0, max=1)
    undo_step_past_bound: bool = field(False, help="with early_stop_log_ratio: the policy step that moved a token "
                                       "past the bound is undone (weights and Adam state put back), so each "
                                       "update ends within it; one extra forward checks the update's last step")
    value_warmup_updates: int = field(0, help="first N updates train the value model only (critic warm-up)", min=0)
    collapse_share: float = field(0.9, help="warn when one action takes more than this share of a batch while "
                                            "batch agreement has not risen", gt=0, max=1)
    # logging, evaluation, checkpoints
    log_every: int = field(1, help="log metrics every N updates", min=1)
    sample_every: int = field(10, help="print sample completions every N updates (0: never)", min=0)
    eval_prompts: int = field(200, help="held-out prompts for agreement before and after (0: skip)", min=0)
    eval_draws: int = field(1, help="sampled answers per held-out prompt in the sampled evaluation (agreement_sampled "
                                    "and reward_mean average them): 4 halves the sampling noise of 1", min=1)
    save_every: int = field(10, help="checkpoint every N updates (0: only at the end)", min=0)
    keep_checkpoints: int = field(2, help="checkpoints kept on disk", min=1)
    resume: bool = field(True, help="continue from the last checkpoint in output_dir when there is one (refused "
                                    "when a setting that changes training differs from the checkpoint's)")
    overwrite: bool = field(False, help="start fresh in output_dir whatever it holds: its checkpoints are ignored "
                                        "and policy/ and value/ replaced even when rlhf did not write them")
    report_to: str = field("tensorboard", help="accelerate tracker: tensorboard | none")
    parallel_value: bool = field(True, help="the value model's forward/backward (and the scoring) on a second thread "
                                            "beside the policy's, each with half the torch threads, where it pays: "
                                            "one process, a CPU, a policy under 50M parameters. Same math")
    cache_trunk: bool = field(True, help="run the frozen layers below the adapters once per rollout: the policy, "
                              "the reference and every PPO epoch start from their output (same math)")
    share_prompts: bool = field(True, help="with samples_per_prompt > 1, every forward after sampling runs each "
                                "prompt once for all its answers (same math; measured in the README)")
    gc_freeze: bool = field(True, help="gc.freeze() after loading: cyclic GC over model objects costs seconds")

    def training_settings(self) -> dict[str, Any]:
        """The settings a checkpoint was trained with: every key but those that only say where to
        write, what to log or how fast to run (same numbers either way)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_TRAINING}

    def validate(self) -> None:
        check_train_layers("ppo", self.train_layers, self.use_lora)
        check_reward_weights(self.rewards)  # here, not only in build_reward: that runs after the policy has loaded
        if self.batch_size % self.num_mini_batches:
            raise UserError(f"batch_size ({self.batch_size}) must be divisible by num_mini_batches "
                            f"({self.num_mini_batches})")
        if self.batch_size % self.samples_per_prompt:
            raise UserError(f"batch_size ({self.batch_size}) must be a multiple of samples_per_prompt "
                            f"({self.samples_per_prompt})")
        if self.score_baseline == "group" and self.samples_per_prompt < 2:
            raise UserError("score_baseline 'group' needs samples_per_prompt >= 2 (each answer is compared "
                            "with its siblings); set --samples_per_prompt 4 or --score_baseline none")
        if self.early_stop_min_prob and not self.early_stop_log_ratio:
            raise UserError("early_stop_min_prob says which tokens the bound watches, but there is no bound: set "
                            "--early_stop_log_ratio (e.g. 1.5) or --early_stop_min_prob 0")
        if self.undo_step_past_bound and not self.early_stop_log_ratio:
            raise UserError("undo_step_past_bound needs a bound: set --early_stop_log_ratio (e.g. 1.5) or "
                            "--undo_step_past_bound false")
        if self.total_episodes < self.batch_size:
            raise UserError(f"total_episodes ({self.total_episodes}) must be at least batch_size ({self.batch_size})")
        if self.total_episodes % self.batch_size:  # updates are whole batches: the rest would silently not run
            lo = self.total_episodes - self.total_episodes % self.batch_size
            raise UserError(f"total_episodes ({self.total_episodes}) must be a multiple of batch_size "
                            f"({self.batch_size}); use {lo} or {lo + self.batch_size}")
