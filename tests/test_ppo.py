"""Our PPO trainer on the tiny stack: outputs, determinism, LoRA reference, resume after SIGKILL,
non-finite stops, two processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, cli_env

from rlhf.config import build
from rlhf.errors import UserError
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.trainer import run

VOLATILE = {"episodes_per_second", "tokens_per_second"}  # wall-clock numbers differ run to run


def ppo_args(stack: dict[str, str], out: Path, **over: Any) -> dict[str, Any]:
    args = {"model": stack["sft"], "reward_model": stack["reward"], "data": stack["data"], "output_dir": str(out),
            "use_lora": False, "total_episodes": 48, "batch_size": 8, "response_length": 16, "eval_prompts": 8,
            "save_every": 0, "report_to": "none", "sample_every": 0, "learning_rate": 1e-3, "seed": 3}
    args.update(over)
    return args


def logged(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # a None (entropy_decision when no answer reached an action) is left out: which keys are left
    # out is still compared, through the rows' key sets
    return [{k: v for k, v in r.items() if k not in VOLATILE and v is not None} for r in rows]


def test_run_writes_policy_value_metrics_and_plot(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    m = run(build(PPOConfig, ppo_args(tiny_stack, out), "t"))
    for key in ("agreement_before", "agreement_after", "json_valid_after", "kl_final", "episodes_per_second",
                "wall_seconds"):
        assert m[key] is not None, key
    assert m["updates"] == 6 and m["world_size"] == 1
    assert set(m["time_split_seconds"]) == {"generate", "score", "forward", "update"}
    rows = logged(out)
    assert [r["update"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("score_mean", "score_std", "kl", "entropy", "approx_kl", "clipfrac", "vf_loss",
                "explained_variance", "response_length", "no_stop_fraction", "agreement_batch",
                "action_share_increase", "action_share_decrease", "action_share_no_change", "collapse",
                "teacher_share_increase"):
        assert key in rows[0], key
    shares = [rows[0][f"action_share_{a}"] for a in ("increase", "decrease", "no_change")]
    assert 0 <= sum(shares) <= 1 + 1e-9 and 0 <= rows[0]["agreement_batch"] <= max(shares) + 1e-9
    assert "collapse_warning" in m and "action_share_sampled_after" in m
    assert "entropy_decision" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (out / "policy" / "model.safetensors").is_file() and (out / "policy" / "tokenizer.json").is_file()
    assert (out / "value" / "config.json").is_file()
    assert (out / "ppo_curves.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["kl_final"] == rows[-1]["kl"]


def test_same_seed_same_numbers(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(build(PPOConfig, ppo_args(tiny_stack, a, total_episodes=24, eval_prompts=0), "t"))
    run(build(PPOConfig, ppo_args(tiny_stack, b, total_episodes=24, eval_prompts=0), "t"))
    run(build(PPOConfig, ppo_args(tiny_stack, c, total_episodes=24, eval_prompts=0, seed=4), "t"))
    assert logged(a) == logged(b)
    assert logged(a) != logged(c)


def test_value_side_thread_computes_the_same_update(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    """The value model's half on a second thread is a scheduling choice, not new math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seq = run(build(PPOConfig, ppo_args(tiny_stack, tmp_path / "seq", total_episodes=24, eval_prompts=0,
                                            parallel_value=False), "t"))
        par = run(build(PPOConfig, ppo_args(tiny_stack, tmp_path / "par", total_episodes=24, eval_prompts=0), "t"))
    finally:
        torch.set_num_threads(threads)
    assert par["value_on_side_thread"] and not seq["value_on_side_thread"]
    assert torch.get_num_threads() == threads
    a, b = logged(tmp_path / "seq"), logged(tmp_path / "par")
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-4, abs=1e-6)


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    """Fresh LoRA adapters start at B = 0, so policy == reference and the first KL is exactly 0."""
    out = tmp_path / "lora"
    m = run(build(PPOConfig, ppo_args(tiny_stack, out, use_lora=True, lora_r=4, total_episodes=16,
                                      eval_prompts=0, kl_estimator="k3"), "t"))
    rows = logged(out)
    assert rows[0]["kl"] == 0.0
    assert m["kl_final"] >= 0.0  # k3 is never negative
    adapter = json.loads((out / "policy" / "adapter_config.json").read_text())
    # the SFT model it was trained on (relative when both live in one run folder: tests/test_models.py)
    assert (out / "policy" / adapter["base_model_name_or_path"]).resolve() == Path(tiny_stack["sft"]).resolve()
    from rlhf.models import load_causal_lm

    assert type(load_causal_lm(str(out / "policy"))).__name__ == "PeftModelForCausalLM"


def test_rule_and_bonus_rewards_mix(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "mix"
    run(build(PPOConfig, ppo_args(tiny_stack, out, rewards={"rule": 0.7, "bonus": 0.2, "model": 0.1},
                                  total_episodes=16, eval_prompts=0, report_to="tensorboard"), "t"))
    assert list(out.glob("**/events.out.tfevents.*")), "no tensorboard event file"
    row = logged(out)[0]
    assert {"reward_rule", "reward_bonus", "reward_model"} <= set(row)
    assert -1.0 <= row["reward_rule"] <= 1.0 and 0.0 <= row["reward_bonus"] <= 1.0


def test_non_finite_reward_stops_with_checkpoint_intact(tiny_stack: dict[str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import rlhf.rewards as rewards

    calls = {"n": 0}
    real = rewards.rule_reward

    def flaky(prompts, responses, has_stop):  # finite for 2 updates, then NaN
        calls["n"] += 1
        out = real(prompts, responses, has_stop)
        return out * float("nan") if calls["n"] > 2 else out

    monkeypatch.setattr(rewards, "rule_reward", flaky)
    out = tmp_path / "nan"
    cfg = build(PPOConfig, ppo_args(tiny_stack, out, rewards={"rule": 1.0}, eval_prompts=0, save_every=1), "t")
    with pytest.raises(UserError, match=r"non-finite reward at update 3.*last good checkpoint is .*update-000002"):
        run(cfg)
    assert (out / "checkpoints" / "update-000002" / "state.json").is_file()


def test_bad_batch_config_is_one_line(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="divisible by num_mini_batches"):
        build(PPOConfig, ppo_args(tiny_stack, tmp_path, batch_size=6, num_mini_batches=4), "t")


def _ppo_cmd(stack: dict[str, str], out: Path, **over: Any) -> list[str]:
    args = ppo_args(stack, out, **over)
    cmd = []
    for k, v in args.items():
        cmd += [f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v)]
    return cmd


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    over = {"total_episodes": 64, "save_every": 1, "eval_prompts": 8}
    ref = tmp_path / "ref"
    run(build(PPOConfig, ppo_args(tiny_stack, ref, **over), "t"))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf", "ppo", *_ppo_cmd(tiny_stack, out, **over)],
                            env=cli_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "update-000003").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "update-000003").is_dir(), "the run never reached update 3"
    assert not (out / "metrics.json").exists()
    resumed = run(build(PPOConfig, ppo_args(tiny_stack, out, **over), "t"))
    expected = json.loads((ref / "metrics.json").read_text())
    assert resumed["resumed_from_update"] >= 3
    for key in ("agreement_before", "agreement_after", "json_valid_after", "kl_final", "score_final",
                "reward_after"):
        assert resumed[key] == expected[key], key
    assert logged(out) == logged(ref)
    a = torch.load(out / "checkpoints" / "update-000008" / "trainer.pt", weights_only=True)["model"]
    b = torch.load(ref / "checkpoints" / "update-000008" / "trainer.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_each_roll_out_their_share(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531",
                           str(REPO_ROOT / "scripts" / "ppo.py"),
                           # a bound the first step crosses (the float rounding of two forwards stays below it): both
                           # processes must stop stepping together
                           *_ppo_cmd(tiny_stack, out, total_episodes=32, early_stop_log_ratio=1e-4)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["updates"] == 4 and m["episodes"] == 32
    assert "world size 2" in proc.stdout
    assert [r["policy_steps"] for r in logged(out)] == [1, 1, 1, 1]


def test_logprobs_recorded_while_sampling_feed_the_update(tiny_stack: dict[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With logprobs_from_generation the old log-probs come from sampling, not a forward pass: one
    policy pass fewer per update; with fresh LoRA (policy == reference) the first KL is 0 up to their
    rounding (1e-13 here), and the first update matches the forward-pass run within that rounding.
    Two minibatches: with one, the rollout's forward is the update's and there is nothing to save."""
    from rlhf.ppo.models import PolicyAndValue

    calls = {"n": 0}
    policy_logits = PolicyAndValue.policy_logits

    def counted(self: PolicyAndValue, *a: Any, **kw: Any) -> torch.Tensor:
        calls["n"] += 1
        return policy_logits(self, *a, **kw)

    monkeypatch.setattr(PolicyAndValue, "policy_logits", counted)
    args = {"use_lora": True, "lora_r": 4, "total_episodes": 16, "eval_prompts": 0, "kl_estimator": "k3",
            "num_mini_batches": 2}
    run(build(PPOConfig, ppo_args(tiny_stack, tmp_path / "fwd", **args), "t"))
    passes_with_forward, calls["n"] = calls["n"], 0
    run(build(PPOConfig, ppo_args(tiny_stack, tmp_path / "gen", logprobs_from_generation=True, **args), "t"))
    assert passes_with_forward - calls["n"] == 2  # 16 episodes / batch 8: one rollout pass saved per update
    fwd, gen = logged(tmp_path / "fwd")[0], logged(tmp_path / "gen")[0]
    assert gen["kl"] == pytest.approx(0.0, abs=1e-6)
    assert gen["score_mean"] == fwd["score_mean"]  # the same samples
    assert gen["entropy"] == pytest.approx(fwd["entropy"], abs=1e-5)
    assert gen["pg_loss"] == pytest.approx(fwd["pg_loss"], abs=1e-5)


def _run_without(attr: str, monkeypatch: pytest.MonkeyPatch, cfg: PPOConfig) -> None:
    """A run with one of the rollout collector's shortcuts turned off."""
    from rlhf.ppo.trainer import PPOTrainer

    init = PPOTrainer.__init__

    def without(self: PPOTrainer, cfg: PPOConfig) -> None:
        init(self, cfg)
        assert getattr(self.collect, attr) is True  # on by default for this set-up
        setattr(self.collect, attr, False)

    monkeypatch.setattr(PPOTrainer, "__init__", without)
    run(cfg)
    monkeypatch.setattr(PPOTrainer, "__init__", init)


def _same_updates(a: Path, b: Path) -> None:
    for row_a, row_b in zip(logged(a), logged(b), strict=True):
        for key in ("score_mean", "kl", "entropy", "pg_loss", "vf_loss", "approx_kl", "clipfrac", "grad_norm_policy",
                    "grad_norm_value"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-4, abs=1e-6), key


def test_one_minibatch_reuses_the_rollout_forward(tiny_stack: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With one minibatch the first PPO step sees the rollout's weights and the whole batch, so the
    rollout's policy and value forwards (kept with their graphs) are that step's: one pass fewer of
    each model per update, and the same update as recomputing them, within rounding."""
    from rlhf.ppo.models import PolicyAndValue

    calls = {"policy": 0, "value": 0}
    for name, key in (("policy_logits", "policy"), ("values", "value")):
        original = getattr(PolicyAndValue, name)

        def counted(self: PolicyAndValue, *a: Any, _original: Any = original, _key: str = key,
                    **kw: Any) -> torch.Tensor:
            calls[_key] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(PolicyAndValue, name, counted)
    args = ppo_args(tiny_stack, tmp_path / "reuse", total_episodes=16, eval_prompts=0)
    run(build(PPOConfig, args, "t"))
    reused = dict(calls)
    calls.update(policy=0, value=0)
    again = build(PPOConfig, {**args, "output_dir": str(tmp_path / "b")}, "t")
    _run_without("reuse_forward", monkeypatch, again)
    assert calls["policy"] - reused["policy"] == 2 and calls["value"] - reused["value"] == 2  # 2 updates
    _same_updates(tmp_path / "reuse", tmp_path / "b")


def test_prompts_read_while_sampling(tiny_stack: dict[str, str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """With the side thread, the value model reads each prompt while the policy samples, and the
    policy keeps its prompt state from sampling; the rollout's forwards then run only the last prompt
    token and the response. Same updates as reading whole rollouts, within rounding."""
    import rlhf.generation
    import rlhf.ppo.rollout

    # the side thread needs two torch threads (one per thread); OMP_NUM_THREADS=1 would give one
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    states = {"n": 0}
    for module in (rlhf.generation, rlhf.ppo.rollout):
        original = module.key_values

        def counted(*a: Any, _original: Any = original) -> Any:
            states["n"] += 1
            return _original(*a)

        monkeypatch.setattr(module, "key_values", counted)
    args = ppo_args(tiny_stack, tmp_path / "split", total_episodes=16, eval_prompts=0)
    run(build(PPOConfig, args, "t"))
    assert states["n"] == 4  # per update: the policy's prompt state (sampling) and the value model's
    _run_without("split_prompt", monkeypatch, build(PPOConfig, {**args, "output_dir": str(tmp_path / "b")}, "t"))
    assert states["n"] == 4
    _same_updates(tmp_path / "split", tmp_path / "b")


def _two_layer_args(tmp_path: Path) -> dict[str, Any]:
    """PPO keys for a 2-layer tiny model from scratch (policy and value), rule reward, 2 updates of 8."""
    from rlhf.data.preference import PreferenceConfig
    from rlhf.data.preference import run as run_data
    from rlhf.models.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64)
    data = tmp_path / "data"
    run_data(build(PreferenceConfig, {"teacher": "rule", "n": 40, "seed": 0, "output_dir": str(data), "sft_n": 8},
                   "test"))
    return {"model": str(base), "value_model": str(base), "reward_model": "", "rewards": {"rule": 1.0},
            "data": str(data), "total_episodes": 16, "batch_size": 8, "num_mini_batches": 2, "num_ppo_epochs": 2,
            "response_length": 12, "eval_prompts": 0, "save_every": 0, "report_to": "none", "sample_every": 0,
            "learning_rate": 3e-3, "seed": 3, "parallel_value": False}


def test_train_layers_moves_only_the_top_layers_and_starts_them_from_the_trunk(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from rlhf.ppo.trainer import PPOTrainer

    cfg = build(PPOConfig, {**_two_layer_args(tmp_path), "use_lora": False, "train_layers": 1,
                            "output_dir": str(tmp_path / "top")}, "t")
    trainer = PPOTrainer(cfg)
    assert trainer.collect.policy_depth == 1 and trainer.reference.model is not None
    trainer.train()
    trainer.runner.close()
    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    after = load_file(str(tmp_path / "top" / "policy" / "model.safetensors"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".layers.1." in k or k == "model.norm.weight" for k in moved), moved
    with pytest.raises(UserError, match="train_layers is for full fine-tuning"):
        build(PPOConfig, {**_two_layer_args(tmp_path), "use_lora": True, "train_layers": 1}, "t")


def test_frozen_trunk_runs_once_per_rollout_and_gives_the_same_updates(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapters on the top layer only: the bottom layer's output is the same for the policy, its
    reference and each PPO epoch, so it runs once per rollout and model. Same updates as running
    every layer each time, within rounding."""
    from rlhf.models.decoder import decoder_backbone
    from rlhf.ppo.trainer import PPOTrainer

    bottom_runs = {"n": 0}
    init = PPOTrainer.__init__

    def counting(self: PPOTrainer, cfg: PPOConfig) -> None:
        init(self, cfg)
        assert self.collect.policy_depth == (1 if cfg.cache_trunk else 0)
        for model in (self.inner.policy, self.inner.value):
            decoder_backbone(model).layers[0].mlp.register_forward_hook(
                lambda *_: bottom_runs.__setitem__("n", bottom_runs["n"] + 1))

    monkeypatch.setattr(PPOTrainer, "__init__", counting)
    args = {**_two_layer_args(tmp_path), "use_lora": True, "value_use_lora": True, "lora_layers": 1, "lora_r": 4}
    run(build(PPOConfig, {**args, "output_dir": str(tmp_path / "trunk")}, "t"))
    cached = bottom_runs["n"]
    bottom_runs["n"] = 0
    run(build(PPOConfig, {**args, "output_dir": str(tmp_path / "plain"), "cache_trunk": False}, "t"))
    # per update, besides sampling (the same in both): without the trunks the policy, the reference and
    # the value model after sampling, then 2 epochs x 2 minibatches x 2 models; with them 1 pass, as
    # the value model starts from the policy's base here and holds its bottom layer alike
    assert bottom_runs["n"] - cached == 2 * (3 + 8 - 1)
    _same_updates(tmp_path / "trunk", tmp_path / "plain")


@pytest.mark.parametrize("adapters", [False, True])
def test_a_prompts_samples_share_its_forward_and_give_the_same_updates(tmp_path: Path, adapters: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """samples_per_prompt 2 with share_prompts: after sampling, every forward runs each prompt once for
    both its answers (the bottom layer sees fewer positions), and the updates are those of running
    every row, within rounding."""
    from rlhf.models.decoder import decoder_backbone
    from rlhf.ppo.trainer import PPOTrainer

    seen = {"positions": 0, "grouped": 0}
    init, rollout = PPOTrainer.__init__, PPOTrainer.rollout

    def counting(self: PPOTrainer, cfg: PPOConfig) -> None:
        init(self, cfg)
        assert self.collect.group_size == (2 if cfg.share_prompts else 1) and self.group == 2
        for model in (self.inner.policy, self.inner.value):
            decoder_backbone(model).layers[0].mlp.register_forward_hook(
                lambda m, i, o: seen.__setitem__("positions", seen["positions"] + i[0].shape[0] * i[0].shape[1]))

    def watched(self: PPOTrainer, prompts: list) -> Any:
        batch = rollout(self, prompts)
        seen["grouped"] += batch.groups is not None
        return batch

    monkeypatch.setattr(PPOTrainer, "__init__", counting)
    monkeypatch.setattr(PPOTrainer, "rollout", watched)
    args = {**_two_layer_args(tmp_path), "samples_per_prompt": 2, "score_baseline": "group", "cache_trunk": adapters}
    if adapters:  # LoRA on the top layer: the groups' layout over the frozen trunk
        args.update(use_lora=True, value_use_lora=True, lora_layers=1, lora_r=4)
    run(build(PPOConfig, {**args, "output_dir": str(tmp_path / "shared")}, "t"))
    shared = dict(seen)
    seen.update(positions=0, grouped=0)
    run(build(PPOConfig, {**args, "output_dir": str(tmp_path / "rows"), "share_prompts": False}, "t"))
    assert shared["grouped"] == 2 and seen["grouped"] == 0  # both updates in the groups' layout, or none
    assert shared["positions"] < (0.9 if adapters else 0.8) * seen["positions"]
    _same_updates(tmp_path / "shared", tmp_path / "rows")


def test_sampling_ignores_the_models_generation_config(tiny_stack: dict[str, str]) -> None:
    """PPO's log-probs assume sampling at exactly the configured temperature/top-k/top-p: a model's own
    generation_config (Qwen2.5-Instruct ships top_k 20, repetition_penalty 1.05) must not leak in, as
    its repetition_penalty did into transformers' generate()."""
    from rlhf.generation import generate
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_stack["sft"], padding_side="left")
    model = load_causal_lm(tiny_stack["sft"]).eval()
    prompt = [{"role": "user", "content": "A chip measures [length, width, height] = [5, 20, 30] mm. "
                                          "Recommend an adjustment as JSON."}]

    def answers() -> tuple[list, list]:
        torch.manual_seed(0)
        sampled = generate(model, tok, [prompt] * 8, max_new_tokens=24, do_sample=True, temperature=0.7)
        greedy = generate(model, tok, [prompt] * 2, max_new_tokens=24, do_sample=False)
        return sampled.response.tolist(), greedy.response.tolist()

    before = answers()
    model.generation_config.top_k, model.generation_config.repetition_penalty = 1, 100.0
    assert answers() == before


@pytest.mark.parametrize("top_k", [0, 3])
def test_sampling_records_what_a_forward_pass_gives(tiny_stack: dict[str, str], top_k: int) -> None:
    """The log-probs and entropies recorded while sampling (what PPO keeps as the old policy) equal a
    forward pass over the finished rollouts at the temperature, also when top-k trims what is drawn."""
    from rlhf.generation import generate
    from rlhf.models import load_causal_lm, load_tokenizer, stop_token_ids
    from rlhf.models.decoder import position_ids_of
    from rlhf.ppo import core

    tok = load_tokenizer(tiny_stack["sft"], padding_side="left")
    model = load_causal_lm(tiny_stack["sft"]).eval()
    prompts = [[{"role": "user", "content": f"A chip measures [length, width, height] = [{i}, 20, {3 * i}] mm. "
                                            "Recommend an adjustment as JSON."}] for i in range(1, 9)]
    torch.manual_seed(0)
    g = generate(model, tok, prompts, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=top_k,
                 record_logprobs=True)
    ids, att = torch.cat([g.query, g.response], 1), torch.cat([g.query_mask, torch.ones_like(g.response)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids_of(att)).logits
    logits = logits[:, g.query.shape[1] - 1:-1]
    mask, _ = core.response_mask(g.response, stop_token_ids(tok), tok.pad_token_id)
    assert g.logprobs.shape == g.response.shape == g.entropy.shape
    assert torch.allclose(g.logprobs * mask, core.logprobs_of(logits, g.response, 0.7) * mask, atol=1e-5)
    assert torch.allclose(g.entropy * mask, core.entropy_of(logits, 0.7) * mask, atol=1e-5)
    if top_k:  # drawn from the top k only, yet scored under the whole distribution
        rank = (logits > logits.gather(-1, g.response.unsqueeze(-1))).sum(-1)
        assert int((rank * mask).max()) < top_k


def test_a_prompts_samples_run_its_prompt_once_and_draw_the_same_answers(tiny_stack: dict[str, str]) -> None:
    """generate(group=3) on prompts in runs of 3: the prompt's forward runs on one row per run, and
    the answers drawn (same seed) and their log-probs are those of running every row."""
    from rlhf.generation import generate
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.models.decoder import decoder_backbone

    tok = load_tokenizer(tiny_stack["sft"], padding_side="left")
    model = load_causal_lm(tiny_stack["sft"]).eval()
    prompts = [[{"role": "user", "content": f"A chip measures [length, width, height] = [{i}, 20, {3 * i}] mm. "
                                            "Recommend an adjustment as JSON."}]
               for i in (1, 12, 123) for _ in range(3)]
    rows: list[int] = []
    decoder_backbone(model).layers[0].mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    runs = []
    for group in (1, 3):
        rows.clear()
        torch.manual_seed(0)
        runs.append(generate(model, tok, prompts, max_new_tokens=12, do_sample=True, temperature=0.7,
                             record_logprobs=True, group=group))
        assert rows[0] == 9 // group and set(rows[1:]) == {9}  # the prompt once per run, then every row
    assert runs[0].texts == runs[1].texts and len(set(runs[1].texts)) > 3
    torch.testing.assert_close(runs[1].logprobs, runs[0].logprobs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="runs of 2"):
        generate(model, tok, prompts[:4], max_new_tokens=4, do_sample=True, group=2)


def test_run_frees_the_trainer_and_its_models(tiny_stack: dict[str, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer gc.freeze()s its objects for speed; run() must hand them back to the collector, or a
    library caller (or the next pipeline stage) keeps every model of a finished PPO run in memory."""
    import gc
    import weakref

    from rlhf.ppo.trainer import PPOTrainer

    alive: list[weakref.ref] = []
    train = PPOTrainer.train

    def keep_refs(self: PPOTrainer) -> dict[str, Any]:
        alive.extend([weakref.ref(self), weakref.ref(self.inner.policy), weakref.ref(self.inner.value)])
        return train(self)

    monkeypatch.setattr(PPOTrainer, "train", keep_refs)
    run(build(PPOConfig, ppo_args(tiny_stack, tmp_path / "run", total_episodes=16, eval_prompts=0), "t"))
    assert gc.get_freeze_count() == 0
    assert alive and all(ref() is None for ref in alive)
    assert (tmp_path / "run" / "ppo_curves.png").is_file()


class _RunsCode:
    """A pickle that, once unpickled, writes a file: what a planted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("planted", ["trainer.pt", "rng-0.pt"])
def test_a_planted_checkpoint_is_refused_and_never_runs(tiny_stack: dict[str, str], tmp_path: Path,
                                                        planted: str) -> None:
    out = tmp_path / "ppo"
    over = {"total_episodes": 16, "save_every": 1, "eval_prompts": 0}
    run(build(PPOConfig, ppo_args(tiny_stack, out, **over), "t"))  # a real run, then one file replaced
    ckpt = sorted((out / "checkpoints").glob("update-*"))[-1]
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(marker)}, ckpt / planted)
    (out / "metrics.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "rlhf", "ppo", *_ppo_cmd(tiny_stack, out, **over)],
                          env=cli_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if "Warning" not in x and x.strip()]
    assert len(lines) == 1 and planted in lines[0] and "refused" in lines[0], proc.stderr[-2000:]
    assert not marker.exists()


def test_resume_refuses_changed_settings_and_resume_false_starts_over(tiny_stack: dict[str, str],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    over = {"total_episodes": 16, "save_every": 1, "eval_prompts": 0}
    run(build(PPOConfig, ppo_args(tiny_stack, out, **over), "t"))
    for key, value in (("learning_rate", 5e-4), ("kl_coef", 0.5), ("seed", 4), ("total_episodes", 32)):
        with pytest.raises(UserError, match=rf"differ from the checkpoint's \({key} .*--resume false"):
            run(build(PPOConfig, ppo_args(tiny_stack, out, **{**over, key: value}), "t"))
    # what only changes logging or where checkpoints go may differ
    run(build(PPOConfig, ppo_args(tiny_stack, out, **{**over, "log_every": 2, "sample_every": 1}), "t"))
    fresh = run(build(PPOConfig, ppo_args(tiny_stack, out, **{**over, "total_episodes": 32, "resume": False}), "t"))
    assert fresh["resumed_from_update"] == 0 and fresh["updates"] == 4
    assert [r["update"] for r in logged(out)] == [1, 2, 3, 4]  # the earlier run's rows are gone


def test_a_finished_constant_schedule_run_continues_to_more_episodes_as_one_run(tiny_stack: dict[str, str],
                                                                                tmp_path: Path) -> None:
    """With lr_schedule constant no step depends on total_episodes: rerunning a finished run with more
    resumes it, and ends as a run that had the larger budget from the start. Fewer are refused."""
    over = {"total_episodes": 32, "save_every": 1, "eval_prompts": 0, "lr_schedule": "constant"}
    run(build(PPOConfig, ppo_args(tiny_stack, tmp_path / "whole", **over), "t"))
    out = tmp_path / "extended"
    run(build(PPOConfig, ppo_args(tiny_stack, out, **{**over, "total_episodes": 16}), "t"))
    longer = run(build(PPOConfig, ppo_args(tiny_stack, out, **over), "t"))
    assert longer["resumed_from_update"] == 2 and longer["updates"] == 4
    assert logged(out) == logged(tmp_path / "whole")
    with pytest.raises(UserError, match=r"total_episodes 32 -> 16"):
        run(build(PPOConfig, ppo_args(tiny_stack, out, **{**over, "total_episodes": 16}), "t"))


def test_a_policy_folder_rlhf_did_not_write_is_refused_before_training(tiny_stack: dict[str, str],
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    mine = out / "policy" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own")
    args = ppo_args(tiny_stack, out, total_episodes=16, eval_prompts=0)
    with pytest.raises(UserError, match=r"policy holds files rlhf did not write.*--overwrite true"):
        run(build(PPOConfig, args, "t"))
    assert mine.read_text() == "my own" and not (out / "metrics.jsonl").exists()
    run(build(PPOConfig, {**args, "overwrite": True}, "t"))
    assert not mine.exists() and (out / "policy" / ".rlhf-owned").is_file()
    run(build(PPOConfig, {**args, "resume": False}, "t"))  # its own policy/ is replaced without the flag


@pytest.mark.parametrize(("max_grad_norm", "expected_step_norm"), [(1.0, 1.0), (0.0, 10.0)])
def test_max_grad_norm_zero_turns_clipping_off(max_grad_norm: float, expected_step_norm: float) -> None:
    """0 steps with the raw gradient (TRL 1.12's PPO never clips) and still reports its norm."""
    from types import SimpleNamespace

    from rlhf.ppo.trainer import PPOTrainer

    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([6.0, 8.0])  # norm 10
    sgd = torch.optim.SGD([w], lr=1.0)  # the step is minus the (clipped) gradient
    owner = SimpleNamespace(_policy_params=[w], _value_params=[], _steppers=[(torch.nn.utils.clip_grad_norm_, sgd)],
                            cfg=SimpleNamespace(max_grad_norm=max_grad_norm))
    norm = PPOTrainer._optimizer_step(owner, 0)
    assert float(norm) == pytest.approx(10.0)
    assert float(w.detach().norm()) == pytest.approx(expected_step_norm, rel=1e-5)
    assert w.grad is None


@pytest.mark.parametrize(("distributed", "scaler", "bare"), [("NO", None, True), ("NO", object(), False),
                                                              ("MULTI_CPU", None, False)])
def test_steppers_bypass_accelerate_only_where_it_adds_nothing(distributed: str, scaler: object, bare: bool) -> None:
    """One process without a loss scaler steps the bare optimizer with torch's clip; several processes
    or fp16's scaler keep accelerate's, which reduce or unscale the gradients first."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhf.ppo.trainer import _steppers

    inner = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2)]
    wrapped = [SimpleNamespace(optimizer=opt) for opt in inner]
    acc = SimpleNamespace(distributed_type=DistributedType[distributed], scaler=scaler,
                          clip_grad_norm_=lambda params, max_norm: None)
    got = _steppers(acc, wrapped)
    if bare:
        assert [opt for _, opt in got] == inner
        assert all(clip is torch.nn.utils.clip_grad_norm_ for clip, _ in got)
    else:
        assert [opt for _, opt in got] == wrapped
        assert all(clip == acc.clip_grad_norm_ for clip, _ in got)


def test_eval_draws_reach_both_evaluation_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """eval_draws is handed to the agreement pass and to the reward pass of PPO's evaluation."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import rlhf.ppo.trainer as trainer

    calls: list[dict[str, Any]] = []

    def fake_evaluate_model(model, tok, prompts, **kw):
        calls.append(kw)
        judged = {"agreement": 0.5, "json_valid": 1.0, "mean_length": 3.0, "action_share": {}, "samples": [],
                  "reward_mean": 0.25}
        return {"greedy": judged, "sampled": judged}

    monkeypatch.setattr(trainer, "evaluate_model", fake_evaluate_model)
    owner = SimpleNamespace(eval_prompts=[[{"role": "user", "content": "x"}]], tok=None, reward_fn=None,
                            cfg=SimpleNamespace(temperature=0.7, response_length=8, seed=0, eval_draws=4),
                            inner=SimpleNamespace(policy=None), runner=SimpleNamespace(all_threads=nullcontext))
    out = trainer.PPOTrainer.evaluate(owner)
    assert [kw["draws"] for kw in calls] == [4, 4]
    assert out["agreement_sampled"] == 0.5 and out["reward_mean"] == 0.25


def test_early_stop_log_ratio_stops_the_policys_steps_once_a_token_moved(tiny_stack: dict[str, str],
                                                                          tmp_path: Path) -> None:
    """Off (and at a bound no token reaches) every epoch steps the policy, with the same numbers; at
    a bound the first step already crosses, only that first step is taken in each update, while the
    value model keeps stepping."""
    runs = {}
    for name, bound, min_prob in (("off", 0.0, 0.0), ("never", 1e9, 0.0), ("first", 1e-9, 0.0),
                                  ("none_watched", 1e-9, 1.0)):
        out = tmp_path / name
        run(build(PPOConfig, ppo_args(tiny_stack, out, total_episodes=24, eval_prompts=0,
                                      early_stop_log_ratio=bound, early_stop_min_prob=min_prob), "t"))
        runs[name] = logged(out)
    # early_stop_min_prob 1: no sampled token is that sure, so the bound watches none and never stops
    assert [r["max_log_ratio"] for r in runs["none_watched"]] == [0.0, 0.0, 0.0]
    assert [{k: v for k, v in r.items() if k != "max_log_ratio"} for r in runs["none_watched"]] == \
        [{k: v for k, v in r.items() if k != "max_log_ratio"} for r in runs["off"]]
    assert [r["policy_steps"] for r in runs["off"]] == [4, 4, 4]
    assert all(r["max_log_ratio"] > 0 for r in runs["off"])
    assert runs["never"] == runs["off"]
    assert [r["policy_steps"] for r in runs["first"]] == [1, 1, 1]
    assert all(r["grad_norm_value"] > 0 for r in runs["first"])
    assert runs["first"][-1]["kl"] != runs["off"][-1]["kl"]


def test_undo_step_past_bound_puts_back_the_step_that_crossed(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    """At a bound the first step crosses, that step is undone in every update: the policy leaves PPO
    as it came in, weight for weight, while the value model learns. At a bound no token reaches, the
    run is the plain one (the extra forward after the last step changes nothing but the stat)."""
    from safetensors.torch import load_file

    runs = {}
    for name, bound, undo in (("off", 0.0, False), ("never", 1e9, True), ("first", 1e-9, True)):
        out = tmp_path / name
        run(build(PPOConfig, ppo_args(tiny_stack, out, total_episodes=24, eval_prompts=0,
                                      early_stop_log_ratio=bound, undo_step_past_bound=undo), "t"))
        runs[name] = logged(out)
    plain = [{k: v for k, v in r.items() if k != "max_log_ratio"} for r in runs["off"]]
    assert [{k: v for k, v in r.items() if k != "max_log_ratio"} for r in runs["never"]] == plain
    # the "never" run also measures the move after the last step, which the plain run never sees
    assert all(n["max_log_ratio"] >= o["max_log_ratio"] for n, o in zip(runs["never"], runs["off"], strict=True))
    assert [r["policy_steps"] for r in runs["first"]] == [0, 0, 0]
    assert all(r["grad_norm_value"] > 0 for r in runs["first"])
    sft = load_file(str(Path(tiny_stack["sft"]) / "model.safetensors"))
    after = load_file(str(tmp_path / "first" / "policy" / "model.safetensors"))
    assert sft.keys() == after.keys() and all(torch.equal(sft[k], after[k]) for k in sft)
    with pytest.raises(UserError, match="undo_step_past_bound needs a bound"):
        build(PPOConfig, ppo_args(tiny_stack, tmp_path / "x", undo_step_past_bound=True), "t")
    with pytest.raises(UserError, match="early_stop_min_prob says which tokens the bound watches"):
        build(PPOConfig, ppo_args(tiny_stack, tmp_path / "x", early_stop_min_prob=0.9), "t")


def test_step_undo_restores_weights_and_adam_state_exactly() -> None:
    """save, step, restore, step: the same weights and Adam state as one step from the start."""
    from rlhf.ppo.undo import StepUndo

    def make() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        return layer, torch.optim.AdamW(layer.parameters(), lr=0.1)

    def step(layer: torch.nn.Linear, opt: torch.optim.AdamW, scale: float) -> None:
        layer(torch.ones(2, 4)).pow(2).sum().mul(scale).backward()
        opt.step()
        opt.zero_grad()

    ref, ref_opt = make()
    step(ref, ref_opt, 1.0)
    step(ref, ref_opt, 1.0)
    layer, opt = make()
    step(layer, opt, 1.0)
    undo = StepUndo(list(layer.parameters()), opt)
    undo.save()
    step(layer, opt, 50.0)  # the step to undo
    assert not torch.equal(layer.weight, ref.weight)
    undo.restore()
    assert not undo.saved
    step(layer, opt, 1.0)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    for p, q in zip(layer.parameters(), ref.parameters(), strict=True):
        assert all(torch.equal(opt.state[p][k], ref_opt.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    fresh, fresh_opt = make()  # undone before the optimizer's first step: no state is left behind
    first = StepUndo(list(fresh.parameters()), fresh_opt)
    first.save()
    step(fresh, fresh_opt, 1.0)
    first.restore()
    assert not fresh_opt.state and torch.equal(fresh.weight, make()[0].weight)
