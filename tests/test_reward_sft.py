"""SFT and the Bradley-Terry reward model: the loss by hand, stage outputs, probing, bad data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf.config import build
from rlhf.errors import UserError
from rlhf.reward import RewardConfig, ScoreConfig, bradley_terry_loss, run, run_score
from rlhf.rewards.model import NORMALIZATION_FILE


def test_bradley_terry_loss_by_hand() -> None:
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (-math.log(1 / (1 + math.exp(-1))) + math.log(2)) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expected)
    # margin 0.5: differences become [0.5, -0.5]; -log sigmoid(x) = log(1 + e^-x)
    with_margin = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5))) / 2
    assert bradley_terry_loss(rc, rr, margin=0.5).item() == pytest.approx(with_margin)
    # centering adds c * mean((rc + rr)^2) = 0.1 * (1 + 0) / 2
    assert bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(expected + 0.05)


def test_sft_stage_outputs(tiny_stack: dict[str, str]) -> None:
    sft = Path(tiny_stack["sft"])
    m = json.loads((sft / "metrics.json").read_text())
    assert m["steps"] == 20 and m["world_size"] == 1
    assert 0.0 <= m["agreement_greedy"] <= 1.0 and "json_valid_greedy" in m
    assert (sft / "model.safetensors").is_file() and (sft / "tokenizer.json").is_file()


def test_balanced_sampler_takes_turns_and_reshuffles_each_epoch() -> None:
    from rlhf.training import BalancedSampler

    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 5
    sampler = BalancedSampler(groups, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(len(groups))) == sorted(second)  # every row once per epoch
    for order in (first, second):
        for i in range(0, 12, 3):
            assert sorted(groups[j] for j in order[i:i + 3]) == ["a", "b", "c"]
    assert first != second  # a new order each epoch
    assert list(BalancedSampler(groups, seed=0)) == first  # the same seed, the same order


def test_sft_balance_actions_gives_each_batch_every_action(tiny_stack: dict[str, str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from trl import SFTTrainer

    from rlhf.chips.advice import parse_advice
    from rlhf.models import load_tokenizer
    from rlhf.sft import SFTStageConfig
    from rlhf.sft import run as run_sft

    tok = load_tokenizer(tiny_stack["base"])
    seen: list[list[str]] = []
    original = SFTTrainer.compute_loss

    def record(self, model, inputs, *args, **kwargs):  # the actions of each batch the trainer learns from
        actions = []
        for ids, labels in zip(inputs["input_ids"], inputs["labels"]):
            answer = tok.decode(ids[labels != -100], skip_special_tokens=True)
            actions.append(parse_advice(answer).action)
        seen.append(sorted(actions))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", record)

    def batches(balance: bool) -> list[list[str]]:
        seen.clear()
        run_sft(build(SFTStageConfig, {"model": tiny_stack["base"], "data": tiny_stack["data"], "use_lora": False,
                                       "output_dir": str(tmp_path / str(balance)), "max_steps": 6,
                                       "per_device_train_batch_size": 6, "eval_prompts": 0, "logging_steps": 100,
                                       "balance_actions": balance}, "test"))
        return list(seen)

    each_twice = sorted(["increase", "decrease", "no_change"] * 2)
    assert batches(True) == [each_twice] * 6
    assert batches(False) != [each_twice] * 6  # random batches: the mix varies


def test_reward_stage_metrics_and_normalization(tiny_stack: dict[str, str]) -> None:
    out = Path(tiny_stack["reward"])
    m = json.loads((out / "metrics.json").read_text())
    for key in ("eval_accuracy", "eval_margin", "reward_chosen_mean", "reward_rejected_std", "accuracy_by_strategy"):
        assert key in m
    assert set(m["accuracy_by_strategy"]) <= {"wrong_action", "mismatched_reason", "corrupted_reason",
                                              "malformed_json", "missing_action", "off_topic"}
    assert m["eval_pairs"] == 12  # 10% of 120
    norm = json.loads((out / NORMALIZATION_FILE).read_text())
    assert norm["std"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and len(cfg["id2label"]) == 1


def test_model_reward_scores_a_cut_off_answer_closed_or_open(tiny_stack: dict[str, str]) -> None:
    """'closed' renders a cut-off answer like a finished one (the template closes the turn); 'open'
    scores the tokens as generated, the turn left open (TRL's way). A finished answer is the same."""
    from rlhf.models.tokens import chat_ids
    from rlhf.rewards.model import ModelReward, score_ids, score_texts

    prompt = [{"role": "user", "content": "A chip measures [length, width, height] = [10, 20, 30] mm. "
                                          "Recommend an adjustment as JSON."}]
    answer = '{"action": "increase", "reason": "Too thin'
    closed_reward = ModelReward(tiny_stack["reward"], normalize=False)
    open_reward = ModelReward(tiny_stack["reward"], normalize=False, unfinished="open")
    conversation = prompt + [{"role": "assistant", "content": answer}]
    closed = score_texts(closed_reward.model, closed_reward.tok, [conversation])[0]
    open_ids = chat_ids(open_reward.tok, prompt, add_generation_prompt=True) + open_reward.tok(
        answer, add_special_tokens=False)["input_ids"]
    as_generated = score_ids(open_reward.model, open_reward.tok, [open_ids])[0]
    assert closed != pytest.approx(as_generated, abs=1e-3)
    finished, cut_off = closed_reward([prompt, prompt], [answer, answer], [True, False]).tolist()
    assert finished == pytest.approx(closed, abs=1e-5) and cut_off == pytest.approx(closed, abs=1e-5)
    finished, cut_off = open_reward([prompt, prompt], [answer, answer], [True, False]).tolist()
    assert finished == pytest.approx(closed, abs=1e-5) and cut_off == pytest.approx(as_generated, abs=1e-5)
    with pytest.raises(UserError, match="score_unfinished"):
        ModelReward(tiny_stack["reward"], unfinished="half")


def test_score_prints_rewards_for_a_pair_and_a_file(tiny_stack: dict[str, str], tmp_path: Path, capsys) -> None:
    m = run_score(build(ScoreConfig, {"model": tiny_stack["reward"], "prompt": "A chip measures [1, 2, 3] mm.",
                                      "response": '{"action": "increase", "reason": "x"}'}, "t"))
    assert m["n"] == 1 and math.isfinite(m["scores"][0])
    assert f"{m['scores'][0]:+.4f}" in capsys.readouterr().out
    m2 = run_score(build(ScoreConfig, {"model": tiny_stack["reward"],
                                       "file": str(Path(tiny_stack["data"]) / "test.jsonl"),
                                       "output_dir": str(tmp_path)}, "t"))
    assert m2["n"] == 24  # chosen and rejected of 12 rows
    assert (tmp_path / "metrics.json").is_file()
    with pytest.raises(UserError, match="--prompt TEXT --response TEXT"):
        run_score(build(ScoreConfig, {"model": tiny_stack["reward"]}, "t"))


def _bad_data(tmp_path: Path, rows: list[dict]) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(text)
    return folder


GOOD = {"prompt": [{"role": "user", "content": "A chip measures [1, 2, 3] mm."}],
        "chosen": [{"role": "assistant", "content": '{"action": "increase", "reason": "r"}'}],
        "rejected": [{"role": "assistant", "content": "nope"}]}


@pytest.mark.parametrize("row, message", [
    ({k: v for k, v in GOOD.items() if k != "rejected"}, r"row 2: missing column 'rejected'"),
    ({**GOOD, "chosen": []}, r"row 2: column 'chosen' must be a non-empty list"),
    ({**GOOD, "chosen": [{"role": "assistant", "content": 7}]}, r"row 2: chosen\[0\].content must be a non-empty"),
    ({**GOOD, "prompt": [{"role": "user", "content": "word " * 400}]}, r"row 2: the prompt is \d+ tokens, longer"),
])
def test_bad_reward_data_names_file_and_row(tiny_stack: dict[str, str], tmp_path: Path, row: dict,
                                            message: str) -> None:
    data = _bad_data(tmp_path, [GOOD, row])
    cfg = build(RewardConfig, {"model": tiny_stack["sft"], "data": str(data), "output_dir": str(tmp_path / "o"),
                               "use_lora": False, "max_steps": 1, "max_length": 128}, "t")
    with pytest.raises(UserError, match=message) as err:
        run(cfg)
    assert "train.jsonl" in str(err.value)


def test_missing_data_folder_is_one_clear_error(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    cfg = build(RewardConfig, {"model": tiny_stack["sft"], "data": str(tmp_path / "nothing"),
                               "output_dir": str(tmp_path / "o")}, "t")
    with pytest.raises(UserError, match="data file not found"):
        run(cfg)


def test_reward_trains_in_two_cpu_processes(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    """torchrun --nproc_per_node 2 gives two gloo processes: half the per-process batch keeps the
    global batch of one process (16 = 8 x 2), and the run reports world size 2."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO_ROOT, cli_env

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "rm2"
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29571",
                           str(REPO_ROOT / "scripts" / "reward.py"), "--model", tiny_stack["sft"],
                           "--data", tiny_stack["data"], "--output_dir", str(out), "--use_lora", "false",
                           "--max_steps", "3", "--per_device_train_batch_size", "8"],
                          env={**cli_env(), "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_batch"] == 16 and m["steps"] == 3
    assert "world size 2" in proc.stdout


def test_sft_train_layers_trains_only_the_last_layers(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from rlhf.sft import SFTStageConfig
    from rlhf.sft import run as run_sft

    base = load_file(Path(tiny_stack["base"]) / "model.safetensors")
    out = tmp_path / "sft"
    run_sft(build(SFTStageConfig, {"model": tiny_stack["base"], "data": tiny_stack["data"], "use_lora": False,
                                   "train_layers": 1, "output_dir": str(out), "max_steps": 2, "learning_rate": 1e-2,
                                   "per_device_train_batch_size": 4, "eval_prompts": 0, "logging_steps": 100}, "test"))
    after = load_file(out / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed and all(".layers.0." in k or k.endswith("model.norm.weight") for k in changed)
    assert "model.embed_tokens.weight" not in changed
    with pytest.raises(UserError, match="train_layers is for full fine-tuning"):
        build(SFTStageConfig, {"use_lora": True, "train_layers": 1}, "test")


def test_action_weights_mark_the_token_that_picks_the_action(tiny_stack: dict[str, str]) -> None:
    from rlhf.models import load_tokenizer
    from rlhf.sft import action_weights

    tok = load_tokenizer(tiny_stack["base"])
    answer = tok('{"action": "decrease", "reason": "Too tall."}', add_special_tokens=False)["input_ids"]
    other = tok("no json here", add_special_tokens=False)["input_ids"]
    labels = torch.tensor([[-100, -100, *answer], [-100, *other, *[-100] * (len(answer) + 1 - len(other))]])
    w = action_weights(labels, lambda t: tok.decode([t]), 10.0)
    pieces = [tok.decode([t]) for t in answer]
    at = next(i for i in range(len(pieces)) if "".join(pieces[:i]).endswith('"action": "'))
    assert w[0, 2 + at] == 10.0 and pieces[at].startswith("de")
    assert w[0].sum() == len(answer) - 1 + 10.0 and w[0, :2].sum() == 0
    assert w[1].tolist() == (labels[1] != -100).float().tolist()  # no action: plain token weights


def test_sft_action_loss_weight_weighs_the_action_token(tiny_stack: dict[str, str], tmp_path: Path) -> None:
    from rlhf.sft import SFTStageConfig
    from rlhf.sft import run as run_sft

    def first_loss(weight: float) -> float:
        m = run_sft(build(SFTStageConfig, {"model": tiny_stack["base"], "data": tiny_stack["data"], "use_lora": False,
                                           "output_dir": str(tmp_path / str(weight)), "max_steps": 1,
                                           "per_device_train_batch_size": 8, "eval_prompts": 0, "logging_steps": 1,
                                           "action_loss_weight": weight}, "test"))
        return m["train_loss"]

    plain, weighted = first_loss(1.0), first_loss(21.0)
    # one step from the same weights: the action token's loss (about ln(vocab) at the start) counts 21 times
    # instead of once in a mean over ~25 answer tokens, so the loss grows by about 20/25 of that token's loss
    assert weighted > plain * 1.4
