"""The PPO math against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from rlhf.ppo import core


def test_masked_mean_var_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert core.masked_mean(x, m).item() == pytest.approx(2.0)
    # unbiased variance of [1, 2, 3] = 1
    assert core.masked_var(x, m).item() == pytest.approx(1.0)
    w = core.masked_whiten(x, m)
    assert w.tolist()[0][:3] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert w[0, 3].item() == 0.0  # padding stays zero
    w2 = core.masked_whiten(x, m, shift_mean=False)
    assert w2.tolist()[0][:3] == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


def test_kl_estimators_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.4)])
    k1 = core.kl_per_token(logp, ref, "k1")
    assert k1.tolist() == pytest.approx([math.log(2), math.log(0.5)])
    # k3 = (q/p - 1) - log(q/p): q/p = 0.5 -> -0.5 + log 2; q/p = 2 -> 1 - log 2
    k3 = core.kl_per_token(logp, ref, "k3")
    assert k3.tolist() == pytest.approx([-0.5 + math.log(2), 1 - math.log(2)])
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        core.kl_per_token(logp, ref, "k2")


def test_response_mask_cuts_after_stop_and_keeps_stop():
    stop, pad = 9, 0
    responses = torch.tensor([[5, 6, 9, 0, 0],   # stop at 2
                              [5, 6, 7, 8, 4],   # no stop: everything counts
                              [9, 0, 0, 0, 0]])  # stop first
    mask, has_stop = core.response_mask(responses, [stop], pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_stop.tolist() == [True, False, True]
    assert core.last_index(mask).tolist() == [2, 4, 0]


def test_logprobs_and_entropy_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    tokens = torch.tensor([[1]])
    assert core.logprobs_of(logits, tokens).item() == pytest.approx(math.log(0.25))
    ent = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert core.entropy_of(logits).item() == pytest.approx(ent)
    # temperature 2 flattens: p ~ sqrt(p)
    p = torch.tensor([0.5, 0.25, 0.25]).sqrt()
    p = p / p.sum()
    assert core.logprobs_of(logits, tokens, temperature=2.0).item() == pytest.approx(math.log(p[1].item()), abs=1e-6)


def test_per_token_rewards_put_score_on_last_valid_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0]])
    r = core.per_token_rewards(torch.tensor([2.0]), kl, mask, kl_coef=0.5)
    assert r.tolist()[0] == pytest.approx([-0.05, -0.1, -0.15 + 2.0, 0.0])


def test_gae_by_hand_with_padding():
    # gamma 1, lambda 0.5, three valid tokens then padding
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 + 0 - 0.4          # 0.6
    d1 = 0.0 + 0.4 - 0.2        # 0.2
    d0 = 0.0 + 0.2 - 0.5        # -0.3
    a2 = d2
    a1 = d1 + 0.5 * a2          # 0.5
    a0 = d0 + 0.5 * a1          # -0.05
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0])


def test_gae_discount():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.zeros(1, 2)
    adv, _ = core.gae(rewards, values, torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.9, 1.0])


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 3)
    # ratios e^0.5=1.65 (A>0, clipped to 1.2), e^-0.5=0.61 (A>0, unclipped min), e^0.5 (A<0, unclipped)
    new = torch.tensor([[0.5, -0.5, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, st = core.policy_loss(new, old, adv, mask, cliprange=0.2)
    r = math.exp(0.5)
    expected = (-1.2 + -math.exp(-0.5) + r) / 3
    assert loss.item() == pytest.approx(expected)
    assert st["clipfrac"].item() == pytest.approx(1 / 3)
    assert st["approx_kl"].item() == pytest.approx(0.125)
    # padding does not count
    loss_pad, _ = core.policy_loss(new, old, adv, torch.tensor([[1, 0, 0]]), cliprange=0.2)
    assert loss_pad.item() == pytest.approx(-1.2)
    # the largest single-token move, over the tokens that count only
    assert st["max_log_ratio"].item() == pytest.approx(0.5)
    moved = torch.tensor([[0.1, -3.0, 9.0]])
    assert core.policy_loss(moved, old, adv, torch.tensor([[1, 1, 0]]))[1]["max_log_ratio"].item() == 3.0
    # watch_min_prob: only the tokens sampled with at least that probability count (here p_old 0.95,
    # 0.2, 0.95: the middle token's 3-nat move is left out, the sure tokens' 0.1 and 9.0 are seen)
    sure = torch.log(torch.tensor([[0.95, 0.2, 0.95]]))
    watched = core.policy_loss(sure + moved, sure, adv, mask, watch_min_prob=0.9)[1]["max_log_ratio"]
    assert watched.item() == pytest.approx(9.0)
    watched = core.policy_loss(sure + moved, sure, adv, torch.tensor([[1, 1, 0]]), watch_min_prob=0.9)[1]
    assert watched["max_log_ratio"].item() == pytest.approx(0.1)


def test_value_loss_clipping_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, 0.0]])
    loss, st = core.value_loss(new, old, ret, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 3.24; token 1: 0.01 vs 0.01
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert st["vf_clipfrac"].item() == pytest.approx(0.5)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    assert core.explained_variance(ret, ret, torch.ones(1, 3)) == pytest.approx(1.0)
    assert core.explained_variance(torch.zeros(1, 3) + 2.0, ret, torch.ones(1, 3)) == pytest.approx(0.0)


def test_adaptive_kl_controller():
    ctl = core.AdaptiveKLController(0.2, target=1.0, horizon=100)
    assert ctl.update(2.0, n_steps=10) == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))  # error clipped to 0.2
    ctl = core.AdaptiveKLController(0.2, target=1.0, horizon=100)
    assert ctl.update(0.9, n_steps=10) == pytest.approx(0.2 * (1 - 0.1 * 10 / 100))
