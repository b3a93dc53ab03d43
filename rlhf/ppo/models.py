"""PPO's models: the policy, the value model (a scalar head at every token) and the frozen reference,
and optionally an auxiliary value head on the policy (`aux_value_coef`).

`load_models` assembles them from a `PPOConfig`; `PolicyAndValue` is the one module the trainer
trains (and DDP wraps); `Reference` gives the reference's log-probs, whether it is a second frozen
copy (full fine-tuning) or the policy itself with its LoRA adapters disabled (no second copy).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhf.models import add_lora, load_causal_lm, load_tokenizer, load_value_model, stop_token_ids
from rlhf.models.decoder import KeyValues, PromptGroups, Trunk, causal_logits, final_hidden, head_outputs, unwrap
from rlhf.models.load import train_last_layers
from rlhf.ppo import core
from rlhf.ppo.config import PPOConfig


class PolicyAndValue(nn.Module):
    """One module for DDP: a forward returns the policy's response logits, per-token values and the
    auxiliary head's values on the policy (None without the head)."""

    def __init__(self, policy: nn.Module, value: nn.Module, aux_value: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.aux_value = aux_value  # a scalar head on the policy's hidden states (PPG), or None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
                policy_trunk: Trunk | None = None, value_trunk: Trunk | None = None,
                groups: PromptGroups | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits, aux = self.policy_outputs(input_ids, attention_mask, n_response, trunk=policy_trunk, groups=groups)
        return logits, self.values(input_ids, attention_mask, n_response, trunk=value_trunk, groups=groups), aux

    def policy_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
                       trunk: Trunk | None = None,
                       groups: PromptGroups | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """policy_logits, and the auxiliary head's V(s_t) [B, T] read from the same hidden states
        (None without the head)."""
        if self.aux_value is None:
            return self.policy_logits(input_ids, attention_mask, n_response, trunk=trunk, groups=groups), None
        hidden = final_hidden(self.policy, input_ids, attention_mask, n_response + 1, trunk=trunk, groups=groups)
        logits = unwrap(self.policy).get_output_embeddings()(hidden)[:, :-1]
        return logits, self.aux_value(hidden[:, :-1].float()).squeeze(-1)

    def policy_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
                      past: KeyValues | None = None, trunk: Trunk | None = None,
                      groups: PromptGroups | None = None) -> torch.Tensor:
        """Logits that predict the response tokens. With `past` (the keys and values of the prompt
        but its last token), `input_ids` are the rest: the last prompt token and the response.
        With `trunk` (the frozen layers' output), only the layers above it run. With `groups`, each
        shared prompt runs once (the trunk is in that layout too)."""
        return causal_logits(self.policy, input_ids, attention_mask, n_response + 1, past, trunk, groups)[:, :-1]

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
               past: KeyValues | None = None, trunk: Trunk | None = None,
               groups: PromptGroups | None = None) -> torch.Tensor:
        """V(s_t) for the states before each response token (`past`, `trunk`, `groups` as for
        policy_logits): the value model's scalar head at every response position, where a sequence
        classifier reads only the last."""
        values = head_outputs(self.value, input_ids, attention_mask, n_response + 1, past, trunk, groups)
        return values.squeeze(-1).float()[:, :-1]


class Reference:
    """The frozen policy the KL penalty measures against: `model` when given (a full fine-tune keeps
    a copy), else the policy with its LoRA adapters disabled (fresh adapters are the identity)."""

    def __init__(self, model: nn.Module | None, temperature: float) -> None:
        self.model, self.temperature = model, temperature

    def logprobs(self, policy: nn.Module, ids: torch.Tensor, att: torch.Tensor, response: torch.Tensor,
                 n_resp: int, trunk: Trunk | None = None, groups: PromptGroups | None = None) -> torch.Tensor:
        """Log-probs [B, n_resp] of `response` under the reference (at the sampling temperature).
        trunk: the policy's frozen layers' output, which is the reference's too (they never train);
        groups: rows sharing a prompt run it once."""
        if self.model is not None:
            ctx, ref = nullcontext(), self.model
        else:
            ctx, ref = policy.disable_adapter(), policy
        with ctx:
            logits = causal_logits(ref, ids, att, n_resp + 1, trunk=trunk, groups=groups)[:, :-1]
        return core.logprobs_of(logits, response, self.temperature)


@dataclass
class Models:
    tok: Any
    stops: list[int]  # token ids that end an answer (empty with stop_token 'none': fixed length)
    model: PolicyAndValue
    reference: Reference


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio compares log-probs of the same weights: dropout would make it noise (as in TRL)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def init_value_head(value: nn.Module, value_src: str, cfg: PPOConfig) -> None:
    """A reward model's head is trained on whole answers only: on prefixes it outputs values of
    +-6 that swamp the advantage of the one token that matters (measured on the tiny model).
    'zero' keeps its backbone features and starts every value at 0; 'reward' keeps the head,
    rescaled like the normalised scores so values and returns share one scale."""
    head = value.score
    with torch.no_grad():
        if cfg.value_head_init == "zero":
            head.weight.zero_()
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
        elif cfg.normalize_reward:
            from rlhf.rewards.model import reward_normalization

            stats = reward_normalization(value_src)
            if stats:
                head.weight.div_(stats[1])


def load_models(cfg: PPOConfig, device: torch.device) -> Models:
    """Tokenizer, policy (+ LoRA), reference and value model, in this order: LoRA's and a head's
    initialisations draw from the global RNG, so the order fixes the numbers of a seed."""
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, padding_side="left")
    stops = stop_token_ids(tok) if cfg.stop_token == "eos" else []
    policy = load_causal_lm(cfg.model, cfg, merge_lora=True)
    policy.generation_config.eos_token_id = stops or None
    ref_model: nn.Module | None = None
    if cfg.use_lora:
        policy = add_lora(policy, cfg)  # the reference is this model with its adapters disabled
    else:
        if cfg.train_layers:
            train_last_layers(policy, cfg.train_layers)
        ref_model = load_causal_lm(cfg.model, cfg, merge_lora=True).to(device).eval()
        ref_model.requires_grad_(False)
    value_src = cfg.value_model or cfg.reward_model or cfg.model
    value = load_value_model(value_src, cfg.__class__(dtype=cfg.dtype, use_lora=False),
                             pad_token_id=tok.pad_token_id)
    init_value_head(value, value_src, cfg)
    if cfg.value_use_lora:
        value = add_lora(value, cfg, task_type="SEQ_CLS")
    disable_dropout(policy)
    disable_dropout(value)
    aux_value = None
    if cfg.aux_value_coef > 0:  # starts at 0 everywhere: the policy's first steps are the plain loss's
        aux_value = nn.Linear(unwrap(policy).get_output_embeddings().in_features, 1)
        with torch.no_grad():
            aux_value.weight.zero_()
            aux_value.bias.zero_()
    return Models(tok, stops, PolicyAndValue(policy, value, aux_value).to(device),
                  Reference(ref_model, cfg.temperature))
