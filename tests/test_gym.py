"""The chip model, the gymnasium environment, its judges and SB3 PPO training."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from ollama_server import Faults, LoopbackOllama

from rlhf.chips import physics
from rlhf.data.tabular import ENV_FILE, TabularDataConfig, read_env_csv
from rlhf.data.tabular import run as run_data
from rlhf.errors import UserError
from rlhf.gym.chip_env import ChipEnv, ScaledObservation
from rlhf.gym.judge import NEUTRAL, ModelJudge, NoJudge, OllamaJudge
from rlhf.ollama.pool import OllamaPool

# -- the chip model ------------------------------------------------------------------------------


def test_power_grows_with_width_and_with_length() -> None:
    for other in (10.0, 60.0, 150.0):
        powers = [physics.power_mw(w, other) for w in range(5, 300, 5)]
        assert all(b > a for a, b in zip(powers, powers[1:]))
        assert physics.power_mw(other, 40.0) == pytest.approx(physics.power_mw(40.0, other))  # area only


def test_performance_saturates_with_area_and_suffers_from_density_and_elongation() -> None:
    sides = list(range(5, 400, 5))
    perf = [physics.performance_score(s, s) for s in sides]
    assert all(b >= a for a, b in zip(perf, perf[1:]))  # square dies: more area, never worse
    gains = np.diff(perf)
    assert gains[-1] < 0.01 * gains.max() and perf[-1] <= 100.0  # ... but with diminishing returns
    # thermal density (mW per area) is highest in the smallest dies, and it throttles them:
    assert physics.thermal_density(10, 10) > physics.thermal_density(40, 40) > physics.thermal_density(80, 80)
    small = physics.performance_score(15, 15)
    unthrottled = 100 * (1 - np.exp(-physics.area(15, 15) / physics.A_SAT))
    assert small < 0.9 * unthrottled
    # the same area, elongated, performs worse (longer critical path):
    assert physics.performance_score(20, 180) < physics.performance_score(60, 60)


def test_optimal_action_is_the_best_next_state_and_points_to_the_sweet_spot() -> None:
    rng = np.random.default_rng(0)
    for w, ln in rng.integers(5, 200, size=(50, 2)).astype(float):
        merits = [physics.merit(*physics.apply_action(w, ln, a)) for a in range(4)]
        assert merits[physics.optimal_action((w, ln))] == max(merits)
    assert physics.optimal_action((20.0, 20.0)) in (0, 2)  # too small: grow
    assert physics.optimal_action((150.0, 150.0)) in (1, 3)  # too big: shrink
    assert physics.optimal_action((20.0, 100.0)) == 0  # elongated and small: widen the short side
    assert physics.apply_action(5.0, 7.0, 1) == (5.0, 7.0) and physics.apply_action(5.0, 7.0, 3) == (5.0, 5.0)


def test_judge_prompts_carry_state_and_action_in_both_languages() -> None:
    obs = [60.0, 40.0, 164.0, 51.2]
    en, zh = physics.judge_prompt(obs, 3), physics.judge_prompt(obs, 3, "zh")
    assert "width=60.0 nm" in en and "decrease length" in en and '"score"' in en
    assert "宽度=60.0nm" in zh and "减少长度" in zh


# -- the environment -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
def test_env_passes_the_gymnasium_checker() -> None:
    check_env(ChipEnv(), skip_render_check=True)
    check_env(ScaledObservation(ChipEnv()), skip_render_check=True)


def _rollout(env: ChipEnv, seed: int, actions: list[int]) -> tuple[list, list[float]]:
    obs, _ = env.reset(seed=seed)
    seen, rewards = [obs], []
    for a in actions:
        obs, r, terminated, truncated, _ = env.step(a)
        seen.append(obs)
        rewards.append(r)
        if terminated or truncated:
            break
    return seen, rewards


def test_seeded_resets_and_rollouts_are_reproducible() -> None:
    actions = [0, 2, 2, 1, 3, 0, 0, 2, 1, 3]
    a_obs, a_rew = _rollout(ChipEnv(), 5, actions)
    b_obs, b_rew = _rollout(ChipEnv(), 5, actions)
    assert np.array_equal(np.array(a_obs), np.array(b_obs)) and a_rew == b_rew
    starts = {tuple(ChipEnv().reset(seed=s)[0]) for s in range(20)}
    assert len(starts) > 10  # different seeds, different chips


def test_actions_change_power_and_performance() -> None:
    env = ChipEnv()
    obs, info = env.reset(options={"chip": (30.0, 30.0)})
    assert info["optimal_action"] in (0, 2)
    grown, *_ = env.step(0)
    assert grown[0] == 35.0 and grown[1] == 30.0
    assert grown[2] > obs[2] and grown[3] > obs[3]
    assert grown[2] == pytest.approx(physics.power_mw(35, 30), rel=1e-6)
    shrunk, *_ = env.step(3)
    assert shrunk[1] == 25.0 and shrunk[2] < grown[2]


class _ConstJudge:
    name = "const"

    def __init__(self, value: float) -> None:
        self.value = value
        self.calls: list[tuple[tuple[float, ...], int]] = []

    def score(self, observation, action: int) -> float:
        self.calls.append((tuple(float(x) for x in observation), action))
        return self.value

    def prefetch(self, observations) -> None:
        pass

    def stats(self) -> dict:
        return {}


def test_reward_is_07_rule_on_the_new_state_plus_03_judge_plus_02_bonus() -> None:
    start = (40.0, 70.0)
    for action in range(4):
        rewards = {}
        for value in (0.0, 1.0):
            judge = _ConstJudge(value)
            env = ChipEnv(judge=judge)
            env.reset(options={"chip": start})
            _, rewards[value], _, _, info = env.step(action)
            assert judge.calls[0][0][:2] == start and judge.calls[0][1] == action  # judged before the move
        assert rewards[1.0] - rewards[0.0] == pytest.approx(0.3)
        optimal = action == physics.optimal_action(start)
        expected = 0.7 * physics.merit(*physics.apply_action(*start, action)) + (0.2 if optimal else 0.0)
        assert rewards[0.0] == pytest.approx(expected)
        assert info["bonus"] == (0.2 if optimal else 0.0)


def test_model_judge_scores_the_best_action_1_and_the_worst_0() -> None:
    judge, obs = ModelJudge(), [30.0, 90.0, 0.0, 0.0]
    scores = [judge.score(obs, a) for a in range(4)]
    assert scores[physics.optimal_action(obs)] == 1.0 and min(scores) == 0.0
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert NoJudge().score(obs, 0) == 0.0


def test_episode_truncates_after_10_steps_and_terminates_at_performance_95() -> None:
    env = ChipEnv()
    env.reset(options={"chip": (40.0, 40.0)})
    flags = [env.step(0)[2:4] for _ in range(10)]
    assert flags[-1] == (False, True) and all(f == (False, False) for f in flags[:-1])
    start, _ = env.reset(options={"chip": (90.0, 95.0)})
    assert start[3] < 95.0  # one step wider crosses 95
    obs, _, terminated, truncated, _ = env.step(0)
    assert obs[3] >= 95.0 and terminated and not truncated


def test_starting_chips_from_the_env_csv(tmp_path: Path) -> None:
    run_data(TabularDataConfig(output_dir=str(tmp_path), variant="env", n=5, seed=2))
    chips = read_env_csv(tmp_path / ENV_FILE)
    env = ChipEnv(start_chips=chips)
    ids = {env.reset(seed=s)[1]["chip_id"] for s in range(30)}
    assert ids <= {c[0] for c in chips} and len(ids) > 1
    bad = tmp_path / "bad.csv"
    bad.write_text("chip_id,width_nm,length_nm\n1,3,40\n")
    with pytest.raises(UserError, match="line 2, column 'width_nm'"):
        read_env_csv(bad)


# -- the Ollama judge ------------------------------------------------------------------------------


def _score_source(messages, fmt, options) -> str:
    return json.dumps({"score": 0.8, "reason": "fine"})


def test_ollama_judge_caches_by_state_and_action_and_batches_prefetch() -> None:
    with LoopbackOllama(sources={"judge": _score_source}) as server:
        judge = OllamaJudge(OllamaPool(model="judge", hosts=server.url, retries=0, backoff=0.0))
        obs = [60.0, 40.0, physics.power_mw(60, 40), physics.performance_score(60, 40)]
        judge.prefetch([obs, obs])  # one state, four actions
        assert len(server.chat_requests()) == 4
        assert judge.score(obs, 2) == 0.8
        assert judge.score([60.01, 40.0, obs[2], obs[3]], 2) == 0.8  # same rounded state
        assert len(server.chat_requests()) == 4  # identical queries: no new request
        judge.score([65.0, 40.0, obs[2], obs[3]], 0)  # a new state fetches its four actions
        assert len(server.chat_requests()) == 8
        assert judge.stats()["cache_hits"] == 2 and judge.stats()["failures_neutral"] == 0


def test_ollama_judge_failures_count_as_neutral() -> None:
    with LoopbackOllama(sources={"judge": _score_source}, faults=Faults(non_json=4)) as server:
        judge = OllamaJudge(OllamaPool(model="judge", hosts=server.url, retries=0, backoff=0.0))
        env = ChipEnv(judge=judge)
        env.reset(options={"chip": (60.0, 40.0)})
        _, _, _, _, info = env.step(1)
        assert info["judge_reward"] == NEUTRAL and judge.stats()["failures_neutral"] == 4


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_ollama_judge_checks_the_host_and_the_model_when_built() -> None:
    from rlhf.gym.judge import make_judge

    with pytest.raises(UserError, match=r"cannot reach Ollama at http://127\.0\.0\.1:\d+: start it with `ollama serve"):
        make_judge("ollama", ollama_host=_closed_port_url())
    with LoopbackOllama(sources={"judge": _score_source}) as server:
        with pytest.raises(UserError, match=r"does not have model 'qwen2\.5:7b': run `ollama pull qwen2\.5:7b`"):
            make_judge("ollama", ollama_host=server.url)
        assert not server.chat_requests()


def _tiny_train(out: Path, **kw) -> dict:
    from rlhf.gym.train import GymTrainConfig, run_train

    return run_train(GymTrainConfig(output_dir=str(out), total_timesteps=128, n_envs=2, n_steps=64, batch_size=64,
                                    n_epochs=1, eval_episodes=2, judge="ollama", ollama_model="judge", **kw))


def test_training_stops_when_most_judgements_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlhf.ollama.pool.MAX_BACKOFF", 0.0)  # the retries' waits, not what is tested
    with LoopbackOllama(sources={"judge": _score_source}, faults=Faults(down_after=0)) as server:
        url = server.url
        with pytest.raises(UserError) as err:
            _tiny_train(tmp_path, ollama_host=url)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"the Ollama judge (model 'judge' at {url}) failed on "
                                                     "20 of its last 20 judgements (http_5xx 20), more than 50%")
    assert message.endswith("check its log (the `ollama serve` output); fix it and rerun, or use --judge model "
                            "(offline)")
    assert not (tmp_path / "agent.zip").exists()


def test_training_logs_and_records_judge_failures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    faults = Faults(bad_prompt=lambda p: "Proposed action: 3 " in p)  # one action of four never conforms
    with LoopbackOllama(sources={"judge": _score_source}, faults=faults) as server:
        m = _tiny_train(tmp_path, ollama_host=server.url)
    judge = m["judge"]
    assert judge["queries"] > 0 and judge["failures_neutral"] == judge["queries"] // 4
    assert json.loads((tmp_path / "metrics.json").read_text())["judge"]["failures_neutral"] == judge["failures_neutral"]
    assert judge["ollama"]["failures"] == {"not_json": judge["failures_neutral"]}
    log = capsys.readouterr().out
    assert "ollama judge: " in log and " judgements failed (scored a neutral 0.5)" in log


# -- training ----------------------------------------------------------------------------------------


def test_short_training_beats_random_and_eval_reloads_without_pickle(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from rlhf.gym.train import GymEvalConfig, GymTrainConfig, load_agent, run_eval, run_train

    out = tmp_path / "agent"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where SB3's default logger would make a folder
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    threads = torch.get_num_threads()
    m = run_train(GymTrainConfig(output_dir=str(out), total_timesteps=6144, eval_episodes=20, seed=0, torch_threads=1))
    assert [p.name for p in scratch.iterdir() if p.name.startswith("SB3")] == []  # no SB3 log folder left
    assert torch.get_num_threads() == threads  # its 1 thread is given back (the next stage in-process keeps its own)
    for key in ("mean_return", "random_mean_return", "oracle_mean_return", "gap_closed", "train_seconds"):
        assert key in m
    assert m["mean_return"] > m["random_mean_return"] + 1.0
    assert m["oracle_mean_return"] > m["random_mean_return"]
    assert (out / "returns.png").read_bytes()[:4] == b"\x89PNG"
    again = run_eval(GymEvalConfig(model_dir=str(out), eval_episodes=20))
    assert again["mean_return"] == pytest.approx(m["mean_return"])
    assert json.loads((out / "eval" / "metrics.json").read_text())["gap_closed"] == pytest.approx(m["gap_closed"])

    # an agent file with an unexpected pickled entry is refused, not unpickled
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "agent.json").write_bytes((out / "agent.json").read_bytes())
    with zipfile.ZipFile(out / "agent.zip") as src, zipfile.ZipFile(tampered / "agent.zip", "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "data":
                obj = json.loads(data)
                obj["payload"] = {":type:": "<class 'function'>", ":serialized:": "gASVAAAA"}
                data = json.dumps(obj).encode()
            dst.writestr(item, data)
    with pytest.raises(UserError, match="unexpected pickled entries"):
        load_agent(tampered, ScaledObservation(ChipEnv()))
