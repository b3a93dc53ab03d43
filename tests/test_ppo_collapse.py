"""What PPO does against a collapse onto one answer: score baselines, several samples per prompt,
a critic warm-up, and the warning when one answer takes over anyway."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ppo import logged, ppo_args

from rlhf.chips import action_token_index
from rlhf.config import build
from rlhf.errors import UserError
from rlhf.ppo import core
from rlhf.ppo import rollout as rollout_module
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.metrics import CollapseWatch
from rlhf.ppo.offsets import check_canonical_prompts
from rlhf.ppo.rollout import PromptStream
from rlhf.ppo.trainer import PPOTrainer


def test_centre_scores_by_hand() -> None:
    s = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0])
    assert torch.equal(core.centre_scores(s, "none"), s)
    # groups of 3: [1, 2, 3] -> 1 - 2.5, 2 - 2, 3 - 1.5; [6, 0, 0] -> 6 - 0, 0 - 3, 0 - 3
    assert torch.allclose(core.centre_scores(s, "group", 3), torch.tensor([-1.5, 0.0, 1.5, 6.0, -3.0, -3.0]))
    b = core.centre_scores(s, "batch")
    assert abs(float(b.mean())) < 1e-6 and abs(float(b.std()) - 1) < 1e-6
    with pytest.raises(ValueError):
        core.centre_scores(s, "group", 4)  # 6 scores are not groups of 4


def test_action_token_index_finds_the_deciding_token() -> None:
    assert action_token_index(['{"', 'action', '":', ' "', 'incr', 'ease', '",']) == 4
    assert action_token_index(['{"action": "', 'no', '_change']) == 1
    assert action_token_index(['{"action": "d']) == 0  # the token that opens the word also starts it
    assert action_token_index(['{"reason": "', 'x']) is None


def test_collapse_watch_warns_once_when_one_answer_takes_over_without_learning() -> None:
    def row(update: int, share: float, agreement: float) -> dict[str, Any]:
        rest = (1 - share) / 2
        return {"update": update, "agreement_batch": agreement, "action_share_increase": share,
                "action_share_decrease": rest, "action_share_no_change": rest}

    watch = CollapseWatch(0.9)
    assert watch.check(row(1, 0.4, 0.33)) is None
    assert watch.check(row(2, 0.95, 0.34)) and watch.first["action"] == "increase"
    assert watch.check(row(3, 0.97, 0.35)) is None and watch.first["update"] == 2  # once
    learning = CollapseWatch(0.9)
    learning.check(row(1, 0.4, 0.33))
    r = row(2, 0.95, 0.60)  # one action dominating a batch, but agreement rose: not a collapse
    assert learning.check(r) is None and r["collapse"] == 0
    called_for = CollapseWatch(0.9)
    called_for.check(row(1, 0.4, 0.33))
    r = {**row(2, 0.95, 0.34), "teacher_share_increase": 1.0}  # the batch's chips all call for it
    assert called_for.check(r) is None and r["collapse"] == 0
    r = {**row(3, 0.95, 0.34), "teacher_share_increase": 0.5}
    assert called_for.check(r) and r["collapse"] == 1


def test_groups_of_samples_per_prompt() -> None:
    stream = PromptStream([f"p{i}" for i in range(10)], seed=0)
    batch = stream.batch(0, 8, 0, 1, group=4)
    assert len(batch) == 8 and batch[:4] == [batch[0]] * 4 and batch[4:] == [batch[4]] * 4
    assert batch[0] != batch[4]
    assert stream.batch(0, 8, 0, 1) == [stream.batch(0, 8, 0, 1)[i] for i in range(8)]  # group 1 as before
    assert stream.batch(1, 8, 0, 1, group=4)[0] not in (batch[0], batch[4])  # the next update moves on


def _trainer(stack: dict[str, str], out: Path, **over: Any) -> PPOTrainer:
    args = ppo_args(stack, out, eval_prompts=0, kl_coef=0.0, parallel_value=False, **over)
    return PPOTrainer(build(PPOConfig, args, "t"))


def _policy_weights(trainer: PPOTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer._policy_params]


def _changed(before: list[torch.Tensor], params: list[torch.nn.Parameter]) -> bool:
    return any(not torch.equal(a, p.detach()) for a, p in zip(before, params))


@pytest.mark.parametrize("baseline", ["none", "group"])
def test_group_baseline_learns_nothing_from_a_score_that_only_depends_on_the_prompt(
        tiny_stack: dict[str, str], tmp_path: Path, baseline: str) -> None:
    """A reward model that rates one chip's answers higher than another's, whatever they say, is the
    offset that pushed every answer one way; compared with its siblings, no answer gains from it."""
    trainer = _trainer(tiny_stack, tmp_path / baseline, samples_per_prompt=4, score_baseline=baseline,
                       missing_eos_penalty=0.0)  # the penalty depends on the answer: not what is tested
    trainer.reward_fn = lambda prompts, texts, has_stop: torch.tensor(
        [float(len(p[-1]["content"]) % 7) for p in prompts])
    before = _policy_weights(trainer)
    prompts = trainer.stream.batch(0, 8, 0, 1, group=4)
    trainer.learn(trainer.rollout(prompts), 0)
    assert _changed(before, trainer._policy_params) == (baseline == "none")


@pytest.mark.parametrize("baseline", ["none", "canonical"])
def test_canonical_baseline_learns_nothing_from_a_score_that_only_depends_on_the_chip(
        tiny_stack: dict[str, str], tmp_path: Path, baseline: str) -> None:
    """The same chip-only score with one answer per prompt: the canonical answers to that chip
    score the same, so their mean takes all of it out."""
    trainer = _trainer(tiny_stack, tmp_path / baseline, score_baseline=baseline, missing_eos_penalty=0.0)
    calls: list[int] = []

    def chip_only(prompts: list, texts: list[str], has_stop: torch.Tensor) -> torch.Tensor:
        calls.append(len(prompts))
        return torch.tensor([float(len(p[-1]["content"]) % 7) for p in prompts])

    trainer.reward_fn = chip_only
    before = _policy_weights(trainer)
    trainer.learn(trainer.rollout(trainer.stream.batch(0, 8, 0, 1)), 0)
    assert _changed(before, trainer._policy_params) == (baseline == "none")
    assert calls == ([8 * 3, 8] if baseline == "canonical" else [8])  # each action's answer per chip, then the batch
    trainer.rollout(trainer.stream.batch(0, 8, 0, 1))
    assert calls[-2:] == [8, 8]  # the same chips again: their canonical answers are not scored twice


def test_canonical_baseline_by_hand() -> None:
    scores, baseline = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, -1.0, 0.5])
    assert torch.equal(core.centre_scores(scores, "canonical", baseline=baseline), torch.tensor([0.5, -1.0, 0.0]))
    with pytest.raises(ValueError, match="one baseline per score"):
        core.centre_scores(scores, "canonical")


def test_canonical_baseline_refuses_prompts_without_a_chip() -> None:
    chip = [{"role": "user", "content": "A chip measures [length, width, height] = [6, 34, 66] mm. Advise."}]
    check_canonical_prompts([chip])
    with pytest.raises(UserError, match="1 of 2 training prompts name no chip.*--score_baseline none"):
        check_canonical_prompts([chip, [{"role": "user", "content": "Write a poem."}]])


def test_value_warmup_moves_only_the_value_model_first(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    trainer = _trainer(tiny_stack, tmp_path / "warm", value_warmup_updates=1)
    policy, value = _policy_weights(trainer), [p.detach().clone() for p in trainer._value_params]
    trainer.learn(trainer.rollout(trainer.stream.batch(0, 8, 0, 1)), 0)
    assert not _changed(policy, trainer._policy_params) and _changed(value, trainer._value_params)
    trainer.learn(trainer.rollout(trainer.stream.batch(1, 8, 0, 1)), 1)
    assert _changed(policy, trainer._policy_params)


def test_group_baseline_needs_groups() -> None:
    with pytest.raises(UserError, match="samples_per_prompt"):
        build(PPOConfig, {"score_baseline": "group"}, "t")
    with pytest.raises(UserError, match="multiple of samples_per_prompt"):
        build(PPOConfig, {"batch_size": 8, "samples_per_prompt": 3}, "t")


def test_answer_entropy_bonus_by_hand() -> None:
    classes = ["increase", "increase", "increase", "decrease", None]
    bonus = core.answer_entropy_bonus(classes, 2.0)
    p_inc, p_dec = 0.75, 0.25
    h = -(p_inc * math.log(p_inc) + p_dec * math.log(p_dec))
    expected = [-2 * (math.log(p_inc) + h)] * 3 + [-2 * (math.log(p_dec) + h), 0.0]
    assert torch.allclose(bonus, torch.tensor(expected))
    assert abs(float(bonus[:4].sum())) < 1e-6  # zero-mean over the answers that have an action
    assert float(bonus[3]) > 0 > float(bonus[0])  # the rare answer gains, the dominant one pays
    assert torch.allclose(core.answer_entropy_bonus(["a", "b", "c"], 1.0), torch.zeros(3), atol=1e-9)  # even: no push
    assert torch.equal(core.answer_entropy_bonus(classes, 0.0), torch.zeros(5))


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_answer_entropy_bonus_alone_moves_the_policy(tiny_stack: dict[str, str], tmp_path: Path,
                                                      coef: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a reward model that scores every answer 0 there is nothing to learn, unless the bonus for
    the batch's answer mix is on; then the policy moves. The test stack's SFT model rarely finishes
    an answer, so the judge here reads an uneven mix (5 increase, 3 decrease) off the rows."""
    rows = iter(range(10**6))
    monkeypatch.setattr(rollout_module, "judge",
                        lambda prompt, text, stopped: (0.0, False, "increase" if next(rows) % 8 < 5 else "decrease"))
    trainer = _trainer(tiny_stack, tmp_path / str(coef), answer_entropy_coef=coef, missing_eos_penalty=0.0)
    trainer.reward_fn = lambda prompts, texts, has_stop: torch.zeros(len(prompts))
    before = _policy_weights(trainer)
    batch = trainer.rollout(trainer.stream.batch(0, 8, 0, 1))
    assert sorted(batch.actions) == ["decrease"] * 3 + ["increase"] * 5
    trainer.learn(batch, 0)
    assert _changed(before, trainer._policy_params) == (coef > 0)


def test_answer_entropy_coef_must_not_be_negative() -> None:
    with pytest.raises(UserError, match="answer_entropy_coef"):
        build(PPOConfig, {"answer_entropy_coef": -0.5}, "t")


def test_action_offsets_by_hand() -> None:
    # 2 chips x 3 actions; chip means 2 and 5: leads [-1, 0, 1] and [2, -1, -1], means [0.5, -0.5, 0]
    scores = torch.tensor([[1.0, 2.0, 3.0], [7.0, 4.0, 4.0]])
    assert torch.allclose(core.action_offsets(scores), torch.tensor([0.5, -0.5, 0.0]))
    assert torch.allclose(core.action_offsets(scores + torch.tensor([[10.0], [-3.0]])), torch.tensor([0.5, -0.5, 0.0]))
    with pytest.raises(ValueError):
        core.action_offsets(torch.ones(4))


def _prefers_increase(prompts: list, texts: list[str], has_stop: torch.Tensor) -> torch.Tensor:
    """A reward model that rates `increase` answers 1 higher on every chip, plus a chip-only part."""
    return torch.tensor([float('"increase"' in t) + len(p[-1]["content"]) % 5 for p, t in zip(prompts, texts)])


@pytest.mark.parametrize("chips", [0, 16])
def test_action_offsets_take_a_per_action_preference_out_of_the_score(
        tiny_stack: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chips: int) -> None:
    """Probed before PPO, the reward's lead for `increase` (+2/3 over the chip's mean of three
    answers) comes out of every `increase` answer's score: the answers PPO compares on a chip then
    differ by what the chip decides, not by which action the reward model likes everywhere."""
    from rlhf.chips import format_advice, judge, rule_reason
    from rlhf.ppo import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "build_reward", lambda *a, **k: _prefers_increase)
    trainer = _trainer(tiny_stack, tmp_path / str(chips), action_offset_chips=chips, missing_eos_penalty=0.0)
    prompt = trainer.stream.prompts[0]
    answers = [format_advice(a, rule_reason(a)) for a in ("increase", "decrease", "no_change")] + ["not json"]
    scores = trainer.collect.score([prompt] * 4, answers, torch.ones(4, dtype=torch.bool))
    actions = [judge(prompt[-1]["content"], a)[2] for a in answers]
    bonus = core.answer_entropy_bonus(actions, trainer.cfg.answer_entropy_coef)
    got = trainer.collect.learning_scores(scores, actions, bonus)
    base = len(prompt[-1]["content"]) % 5
    if chips:
        assert trainer.action_offsets == pytest.approx({"increase": 2 / 3, "decrease": -1 / 3, "no_change": -1 / 3})
        assert got.tolist() == pytest.approx([base + 1 / 3] * 3 + [base])  # an invalid answer keeps its score
    else:
        assert trainer.action_offsets == {}
        assert got.tolist() == pytest.approx([base + 1, base, base, base])


def test_action_offset_probe_refuses_prompts_without_chips() -> None:
    from rlhf.ppo.offsets import probe_action_offsets

    prompts = [[{"role": "user", "content": "Write a haiku."}]]
    with pytest.raises(UserError, match="action_offset_chips 0"):
        probe_action_offsets(lambda p, t, s: torch.zeros(len(p)), prompts, 10)


def test_reward_probe_script_reads_a_run(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    """scripts/reward_probe.py on a run folder: the offsets sum to zero and every chip lands in a band."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "reward").symlink_to(tiny_stack["reward"])
    (run / "data").symlink_to(tiny_stack["data"])
    script = Path(__file__).resolve().parents[1] / "scripts" / "reward_probe.py"
    proc = subprocess.run([sys.executable, str(script), str(run), "--chips", "30"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(": 30 chips")
    offsets = [float(part.split()[-1]) for part in lines[1].removeprefix("offsets: ").split(", ")]
    assert len(offsets) == 3 and abs(sum(offsets)) < 0.02  # printed to 2 decimals
    bands = [line for line in lines if line.startswith("  [")]
    assert sum(int(line.split(": ")[1].split(",")[0]) for line in bands) == 30
    missing = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode != 0 and "needs reward/ and data/train.jsonl" in missing.stderr


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_aux_value_head_alone_moves_the_policy(tiny_stack: dict[str, str], tmp_path: Path, coef: float) -> None:
    """One score for every answer, lambda 1 and a value model starting at 0: every advantage is the
    same, so whitened they are all 0 and the policy loss has nothing to push. The auxiliary value
    head still has returns to fit, and after its first step (it starts at 0, so the policy's
    layers get no gradient through it yet) its loss moves the policy's own weights."""
    trainer = _trainer(tiny_stack, tmp_path / str(coef), aux_value_coef=coef, lam=1.0, missing_eos_penalty=0.0)
    trainer.reward_fn = lambda prompts, texts, has_stop: torch.ones(len(prompts))
    own = list(trainer.inner.policy.parameters())
    before = [p.detach().clone() for p in own]
    stats = trainer.learn(trainer.rollout(trainer.stream.batch(0, 8, 0, 1)), 0)
    assert _changed(before, own) == (coef > 0)
    assert ("aux_value_loss" in stats) == (coef > 0)
    if coef:
        assert stats["aux_value_loss"] > 0 and trainer.inner.aux_value is not None
    else:
        assert trainer.inner.aux_value is None


def test_aux_value_head_is_checkpointed_and_left_out_of_the_policy(tiny_stack: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """The head trains only: a resumed run gets it back from the checkpoint, policy/ loads as the
    plain causal LM it was, and each logged row carries the head's loss."""
    from safetensors import safe_open

    out = tmp_path / "aux"
    args = ppo_args(tiny_stack, out, total_episodes=16, save_every=1, eval_prompts=0, aux_value_coef=0.5,
                    lr_schedule="constant")  # a longer run may resume a constant schedule
    run_ppo = PPOTrainer(build(PPOConfig, args, "t"))
    run_ppo.train()
    rows = logged(out)
    assert len(rows) == 2 and all(math.isfinite(r["aux_value_loss"]) for r in rows)
    with safe_open(str(out / "policy" / "model.safetensors"), "pt") as f:
        assert not any("aux" in k for k in f.keys())
    saved = torch.load(out / "checkpoints" / "update-000002" / "trainer.pt", weights_only=True)["model"]
    head = run_ppo.inner.aux_value
    assert torch.equal(saved["aux_value.weight"], head.weight.detach()) and head.weight.abs().sum() > 0
    resumed = PPOTrainer(build(PPOConfig, {**args, "total_episodes": 24}, "t"))
    resumed.maybe_resume()
    assert resumed.start_update == 2 and torch.equal(resumed.inner.aux_value.weight, head.weight)


def test_class_means_by_hand() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, -4.0])
    classes = ["increase", "increase", "decrease", "decrease", None]
    assert torch.equal(core.class_means(scores, classes), torch.tensor([1.5, 1.5, 4.0, 4.0, 0.0]))
    assert torch.equal(core.class_means(scores, [None] * 5), torch.zeros(5))


def _shaped(trainer: PPOTrainer, scores: torch.Tensor, actions: list[str | None]) -> torch.Tensor:
    """The whitened advantages of one-token answers with these scores, no KL and values of 0."""
    zeros = torch.zeros(len(actions), 1)
    _, advantages, _ = trainer.collect._shape(scores, actions, zeros, zeros, zeros, torch.ones(len(actions), 1), 0.0)
    return advantages[:, 0]


@pytest.mark.parametrize("centre", [False, True])
def test_centre_actions_leaves_only_what_the_chip_decides(tiny_stack: dict[str, str], tmp_path: Path,
                                                          centre: bool) -> None:
    """A reward that rates `increase` 1 above `decrease` on every chip gives no advantage once each
    action's batch mean is out; a chip-dependent part within one action still does, and the
    answer-mix bonus comes back after the centring."""
    trainer = _trainer(tiny_stack, tmp_path / str(centre), centre_actions=centre)
    actions: list[str | None] = ["increase", "increase", "decrease", "decrease"]
    per_action = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert bool(_shaped(trainer, per_action, actions).abs().max() > 0.5) != centre
    ranked = _shaped(trainer, per_action + torch.tensor([0.5, -0.5, 0.0, 0.0]), actions)
    assert float(ranked[0]) > float(ranked[1])
    if centre:
        assert float(ranked[0]) > 0 > float(ranked[1])
        assert float(ranked[2]) == float(ranked[3]) == pytest.approx(0.0, abs=1e-5)
    with_bonus = _trainer(tiny_stack, tmp_path / f"bonus{centre}", centre_actions=centre, answer_entropy_coef=1.0)
    uneven: list[str | None] = ["increase", "increase", "increase", "decrease"]
    got = _shaped(with_bonus, torch.zeros(4), uneven)
    assert float(got[3]) > 0 > float(got[0])  # the rare answer gains either way


def test_centre_actions_stops_a_per_action_preference_moving_the_policy(
        tiny_stack: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through one update: the reward depends only on the answer's action; with the
    class means out, every advantage is 0 and the policy does not move; without, it does."""
    def action_of(text: str) -> str:
        return "increase" if len(text) % 2 else "decrease"

    monkeypatch.setattr(rollout_module, "judge", lambda prompt, text, stopped: (True, False, action_of(text)))
    moved = {}
    for centre in (False, True):
        trainer = _trainer(tiny_stack, tmp_path / str(centre), centre_actions=centre, missing_eos_penalty=0.0)
        trainer.reward_fn = lambda prompts, texts, has_stop: torch.tensor(
            [float(action_of(t) == "increase") for t in texts])
        before = _policy_weights(trainer)
        batch = trainer.rollout(trainer.stream.batch(0, 8, 0, 1))
        assert set(batch.actions) == {"increase", "decrease"}  # both classes, or the test shows nothing
        trainer.learn(batch, 0)
        moved[centre] = _changed(before, trainer._policy_params)
    assert moved == {False: True, True: False}


def test_canonical_baselines_come_back_with_a_resume(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    """A resumed run takes each chip's baseline from the checkpoint, as scored before the stop: not
    rescored in other batches (other float rounding), nor scored twice."""
    trainer = _trainer(tiny_stack, tmp_path / "run", score_baseline="canonical")
    prompts = trainer.stream.batch(0, 8, 0, 1)
    before = trainer.collect.baselines(prompts)
    trainer.save_checkpoint(1)
    again = _trainer(tiny_stack, tmp_path / "run", score_baseline="canonical")
    again.maybe_resume()
    assert again.start_update == 1
    calls: list[int] = []
    again.collect.baselines.score = lambda p, t, s: calls.append(len(p)) or torch.zeros(len(p))
    assert torch.equal(again.collect.baselines(prompts), before) and calls == []
    fresh = _trainer(tiny_stack, tmp_path / "fresh", score_baseline="canonical")
    fresh.collect.baselines.score = again.collect.baselines.score
    fresh.collect.baselines(prompts)
    assert calls == [8 * 3]  # without the checkpoint every chip is scored
