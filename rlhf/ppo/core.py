"""The PPO math as pure functions on tensors: no models, no I/O.

Shapes: B sequences x T response tokens. `mask` is 1 on response tokens up to and including the
stop token and 0 after it (and on padding). Every reduction is over valid tokens only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over valid tokens; invalid positions come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def logprobs_of(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(token) under logits / temperature, gathered per position: [B, T, V] x [B, T] -> [B, T]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: Tensor, temperature: float = 1.0) -> Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, >= 0,
    lower variance), as in Schulman's note "Approximating KL divergence"."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def response_mask(responses: Tensor, stop_ids: list[int], pad_id: int | None = None) -> tuple[Tensor, Tensor]:
    """Mask of the tokens that count: up to and including the first stop token.

    Returns (mask [B, T] long, has_stop [B] bool). Without a stop token the whole sampled length
    counts (minus trailing padding), and the caller may apply `missing_eos_penalty`."""
    is_stop = torch.zeros_like(responses, dtype=torch.bool)
    for sid in stop_ids:
        is_stop |= responses == sid
    has_stop = is_stop.any(dim=1)
    T = responses.shape[1]
    last = torch.full_like(has_stop, T - 1, dtype=torch.long)
    first_stop = torch.where(has_stop, is_stop.float().argmax(dim=1), last)
    positions = torch.arange(T, device=responses.device).unsqueeze(0)
    mask = positions <= first_stop.unsqueeze(1)
    if pad_id is not None and pad_id not in stop_ids:
        # generate() pads finished rows; for rows without a stop, padding marks nothing real.
        mask &= ~((responses == pad_id) & ~has_stop.unsqueeze(1))
    return mask.long(), has_stop


def last_index(mask: Tensor) -> Tensor:
    """Index of the last valid token of each row (0 for an empty row)."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -beta * KL_t on every valid token, plus the sequence score on the last valid token."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards


def centre_scores(scores: Tensor, mode: str, group_size: int = 1, baseline: Tensor | None = None) -> Tensor:
    """The score PPO learns from, with a baseline taken out before GAE.

    'none': as given. 'batch': (s - mean) / std over the batch, so a reward model that rates every
    answer high (or low) gives no push of its own. 'group': rows come in consecutive groups of
    `group_size` samples of one prompt, and each score loses the mean of the *other* samples of its
    prompt (RLOO's leave-one-out baseline, Ahmadian et al. 2024): what stays is how much better this
    answer is than the policy's other answers to the same chip, which no per-prompt offset of the
    reward model can fake. 'canonical': each score less `baseline`, one per row (the mean score of
    the task's canonical answers to that row's prompt): the same per-prompt baseline from a fixed
    set of answers, so every sample can be of a different prompt."""
    if mode == "none":
        return scores
    if mode == "canonical":
        if baseline is None or baseline.shape != scores.shape:
            raise ValueError(f"score baseline 'canonical' needs one baseline per score, got "
                             f"{None if baseline is None else tuple(baseline.shape)} for {tuple(scores.shape)}")
        return scores - baseline.to(scores.dtype)
    if mode == "batch":
        std = scores.std() if scores.numel() > 1 else scores.new_tensor(0.0)
        return (scores - scores.mean()) / (std + 1e-8)
    if mode == "group":
        if group_size < 2 or scores.numel() % group_size:
            raise ValueError(f"score baseline 'group' needs groups of >= 2 samples, got {group_size} "
                             f"for {scores.numel()} scores")
        groups = scores.view(-1, group_size)
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others).view(-1)
    raise ValueError(f"score baseline must be 'none', 'batch', 'group' or 'canonical', got {mode!r}")


def class_means(scores: Tensor, classes: list[str | None]) -> Tensor:
    """Each score's class mean: the mean score of the batch's answers of its class (an action here;
    0 for an answer with no class), which `centre_actions` takes out.

    Taken out of the scores, it leaves each action's answers ranked against each other only: an
    action's answers score above their class mean on the chips where that action is better than on
    the others. While the policy's action mix is the same on every chip, the gradient on that mix is
    then exactly zero in every batch, so the mix no longer random-walks on which chips a batch drew
    for which action; only what the chip decides pushes."""
    out = torch.zeros_like(scores)
    for c in {c for c in classes if c is not None}:
        rows = torch.tensor([k == c for k in classes], device=scores.device)
        out[rows] = scores[rows].mean()
    return out


def action_offsets(scores: Tensor) -> Tensor:
    """Each action's mean lead over the chip's mean, from scores [n_chips, n_actions] of one answer
    per action on each chip: offset_a = mean_c (s[c, a] - mean_a' s[c, a']).

    A reward model that rates one action's answers higher on every chip has a positive offset for
    it; subtracting it from that action's answers leaves what the chip decides (which action is
    best *here*) and removes the push toward one answer everywhere. The offsets sum to zero."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"action offsets need scores [chips, actions >= 2], got shape {tuple(scores.shape)}")
    return (scores - scores.mean(1, keepdim=True)).mean(0)


def answer_entropy_bonus(classes: list[str | None], coef: float) -> Tensor:
    """A per-answer bonus whose policy gradient is coef * grad H(p), with p the batch's share of each
    answer class (an action here; None for an answer with no class, which gets 0).

    bonus_i = -coef * (log p(c_i) + H(p)): REINFORCE with -log p(c) as the reward ascends the
    entropy of the batch's class mix (the +1 of d/dp(-p log p) has zero mean and drops out), and
    the H(p) shift makes the bonus zero-mean over the classed answers. It penalises a policy that
    gives every prompt the same answer, not one that is confident per prompt: a policy that answers
    each chip correctly keeps the teacher's mix (33/33/34 %) and gets no push at all."""
    counts: dict[str, int] = {}
    for c in classes:
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    n = sum(counts.values())
    out = torch.zeros(len(classes))
    if coef == 0 or n == 0:
        return out
    log_p = {c: math.log(k / n) for c, k in counts.items()}
    entropy = -sum(k / n * log_p[c] for c, k in counts.items())
    for i, c in enumerate(classes):
        if c is not None:
            out[i] = -coef * (log_p[c] + entropy)
    return out


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the valid tokens of each row.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero
    after the last valid token (the episode ends there). Returns (advantages, returns = A + V),
    both zero on invalid positions."""
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * m


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float = 0.2, watch_min_prob: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate: mean over valid tokens of max(-A r, -A clip(r, 1-e, 1+e)). The stat
    max_log_ratio covers the tokens sampled with probability >= watch_min_prob (0: every token)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "max_log_ratio": max_log_ratio(logp.detach(), old_logp, mask, watch_min_prob),
    }
    return loss, stats


def max_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, min_prob: float = 0.0) -> Tensor:
    """The largest |log pi/pi_old| of one valid token that pi_old sampled with probability at least
    `min_prob`: the mean move hides a single token's collapse."""
    if min_prob > 0:
        mask = mask * (old_logp >= math.log(min_prob))
    return ((logp - old_logp).abs() * mask).max()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * mean over valid tokens of max((V-R)^2, (V_clip-R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    sq = (values - returns) ** 2
    sq_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(sq, sq_clipped), mask)
    return loss, {"vf_clipfrac": masked_mean((sq_clipped > sq).float(), mask)}


def aux_value_loss(aux_values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Phasic Policy Gradient's auxiliary value loss (Cobbe et al. 2021): 0.5 * mean over valid
    tokens of (V_aux - R)^2, unclipped; the head sits on the policy, so its gradient shapes the
    policy's features."""
    return 0.5 * masked_mean((aux_values - returns) ** 2, mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_r)


class AdaptiveKLController:
    """Ziegler et al. (2019): beta_{n+1} = beta_n (1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if math.isfinite(current_kl):
            error = max(-0.2, min(0.2, current_kl / self.target - 1))
            self.value *= 1 + error * n_steps / self.horizon
        return self.value
