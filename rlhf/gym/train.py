"""stable-baselines3 PPO on the chip environment, and its evaluation against random and an oracle.

`rlhf gym train --output_dir DIR [--total_timesteps N] [--seed S]`
  trains PPO with the standard MlpPolicy (an actor-critic MLP: no LLM in the policy; a judge, if
  any, only shapes the env's reward) on fixed-scale observations, saves DIR/agent.zip and
  DIR/agent.json (how to rebuild the env and the observation scale), evaluates it and writes
  DIR/metrics.json and DIR/returns.png.
`rlhf gym eval --model_dir DIR` re-evaluates a saved agent.

Evaluation: the same 100 seeded episodes (same starting chips) for three policies: the trained
agent (deterministic), a uniform random policy and a greedy oracle that always takes the chip
model's optimal action. `gap_closed = (agent - random) / (oracle - random)` of mean returns.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rlhf.chips import physics
from rlhf.config import SEED, field
from rlhf.errors import UserError
from rlhf.gym.judge import NEUTRAL
from rlhf.io import atomic_write_json, write_metrics

AGENT_FILE = "agent.zip"
AGENT_META = "agent.json"
EVAL_SEED = 10_000  # evaluation episodes use seeds EVAL_SEED.. (training envs use --seed..)
# The entries SB3 stores with cloudpickle; loading supplies them, so nothing is unpickled.
SERIALIZED_KEYS = {"policy_class", "observation_space", "action_space", "rollout_buffer_class",
                   "clip_range", "lr_schedule"}


@dataclass
class GymTrainConfig:
    output_dir: str = field("runs/gym", help="folder for agent.zip, agent.json, metrics.json, returns.png")
    seed: int = field(0, help="seed of PPO and of the training envs' starting chips", **SEED)
    total_timesteps: int = field(60_000, help="environment steps of PPO training", min=1)
    n_envs: int = field(8, help="parallel (in-process) environments", min=1)
    n_steps: int = field(128, help="rollout steps per env per PPO update", min=1)
    batch_size: int = field(256, help="PPO minibatch size", min=1)
    n_epochs: int = field(10, help="PPO epochs per update", min=1)
    learning_rate: float = field(1e-3, help="Adam learning rate", gt=0)
    gamma: float = field(0.9, help="discount; episodes are 10 steps", min=0, max=1)
    gae_lambda: float = field(0.95, help="GAE lambda", min=0, max=1)
    ent_coef: float = field(0.0, help="entropy bonus", min=0)
    net_arch: list[int] = field([64, 64], help="hidden layers of the policy and value MLPs", min=1)
    judge: Literal["none", "model", "ollama"] = field("model", help="judge term of the reward (see rlhf.gym.judge)")
    ollama_model: str = field("qwen2.5:7b", help="model of the ollama judge")
    ollama_host: str = field("", help="Ollama host(s) for the ollama judge, comma separated (default $OLLAMA_HOST)")
    ollama_cache: str = field("", help="disk cache folder for the ollama judge's answers (default: none)")
    language: Literal["en", "zh"] = field("en", help="language of the ollama judge's prompt")
    env_csv: str = field("", help="starting chips from an env CSV (`rlhf data tabular --variant env`); "
                                  "default: sampled")
    eval_episodes: int = field(100, help="seeded evaluation episodes per policy", min=1)
    torch_threads: int = field(1, help="torch threads (1 is fastest for these tiny MLPs)", min=1)

    def validate(self) -> None:
        if not self.net_arch:
            raise UserError("--net_arch needs at least one layer, e.g. 64,64")


@dataclass
class GymEvalConfig:
    model_dir: str = field(help="folder written by `rlhf gym train`")
    output_dir: str = field("", help="where metrics.json and returns.png go (default: MODEL_DIR/eval)")
    eval_episodes: int = field(100, help="seeded evaluation episodes per policy", min=1)
    seed: int = field(EVAL_SEED, help="seed of the first evaluation episode (episode i uses seed + i)", **SEED)
    ollama_host: str = field("", help="override the Ollama host(s) of an ollama judge")
    torch_threads: int = field(1, help="torch threads", min=1)


# Training-time buffers SB3 would pickle into the zip; excluded at save, rebuilt by `learn`.
RUNTIME_STATE = ["_last_obs", "_last_original_obs", "_last_episode_starts", "ep_info_buffer", "ep_success_buffer"]


# -- environments ------------------------------------------------------------------------------

def make_env_factory(env_cfg: dict[str, Any], judge: Any, start_chips: list | None) -> Callable[[], Any]:
    from rlhf.gym.chip_env import ChipEnv, ScaledObservation

    def make() -> Any:
        env = ChipEnv(judge=judge, start_chips=start_chips)
        return ScaledObservation(env, env_cfg["obs_scale"])

    return make


def _judge_from(env_cfg: dict[str, Any], host_override: str = "") -> Any:
    from rlhf.gym.judge import make_judge
    from rlhf.ollama.names import DEFAULT_MODEL

    return make_judge(env_cfg["judge"], ollama_model=env_cfg.get("ollama_model", DEFAULT_MODEL),
                      ollama_host=host_override or env_cfg.get("ollama_host") or None,
                      language=env_cfg.get("language", "en"), cache_dir=env_cfg.get("ollama_cache") or None)


def _print_judge(judge: Any) -> None:
    """An LLM judge's failures in the log (metrics.json has them under judge.failures_neutral)."""
    stats = judge.stats()
    if "failures_neutral" in stats:
        print(f"{stats['judge']} judge: {stats['failures_neutral']} of {stats['queries']} judgements failed "
              f"(scored a neutral {NEUTRAL}), {stats['cache_hits']} answered from memory")


def _start_chips(env_cfg: dict[str, Any]) -> list | None:
    from rlhf.data.tabular import read_env_csv

    return read_env_csv(env_cfg["env_csv"]) if env_cfg.get("env_csv") else None


# -- evaluation --------------------------------------------------------------------------------

def run_episodes(policy: Callable[[np.ndarray, Any], int], make_env: Callable[[], Any], episodes: int,
                 seed: int) -> list[float]:
    """Return of each episode; episode i starts from env.reset(seed=seed + i), so every policy
    sees the same starting chips. `policy(obs, env)` gets the (scaled) observation and the env."""
    env = make_env()
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs, env))
            total += reward
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def oracle_policy(obs: np.ndarray, env: Any) -> int:
    base = env.unwrapped
    return physics.optimal_action((base.width, base.length))


def random_policy(seed: int) -> Callable[[np.ndarray, Any], int]:
    rng = np.random.default_rng(seed)
    return lambda obs, env: int(rng.integers(physics.N_ACTIONS))


def agent_policy(model: Any) -> Callable[[np.ndarray, Any], int]:
    return lambda obs, env: int(model.predict(obs, deterministic=True)[0])


def evaluate(model: Any, make_env: Callable[[], Any], episodes: int, seed: int) -> dict[str, list[float]]:
    return {
        "agent": run_episodes(agent_policy(model), make_env, episodes, seed),
        "random": run_episodes(random_policy(seed), make_env, episodes, seed),
        "oracle": run_episodes(oracle_policy, make_env, episodes, seed),
    }


def summarise(returns: dict[str, list[float]]) -> dict[str, Any]:
    mean = {k: float(np.mean(v)) for k, v in returns.items()}
    gap = mean["oracle"] - mean["random"]
    return {
        "mean_return": mean["agent"], "std_return": float(np.std(returns["agent"])),
        "random_mean_return": mean["random"], "oracle_mean_return": mean["oracle"],
        "gap_closed": (mean["agent"] - mean["random"]) / gap if abs(gap) > 1e-9 else float("nan"),
        "eval_episodes": len(returns["agent"]),
    }


def plot_returns(returns: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {"agent": "tab:blue", "random": "tab:gray", "oracle": "tab:green"}
    for name, values in returns.items():
        label = f"{name} (mean {np.mean(values):.2f})"
        ax.plot(range(len(values)), values, ".", color=colours[name], alpha=0.7, label=label)
        ax.axhline(float(np.mean(values)), color=colours[name], lw=1)
    ax.set_xlabel("evaluation episode (seeded start chip)")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# -- saving and loading ------------------------------------------------------------------------

def load_agent(model_dir: str | Path, env: Any) -> tuple[Any, dict[str, Any]]:
    """Load agent.zip without unpickling: the pickled entries of SB3's file are replaced by values
    rebuilt here, and an unexpected pickled entry means a foreign file."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.buffers import RolloutBuffer
    from stable_baselines3.common.policies import ActorCriticPolicy

    model_dir = Path(model_dir)
    meta_path, zip_path = model_dir / AGENT_META, model_dir / AGENT_FILE
    if not meta_path.is_file() or not zip_path.is_file():
        raise UserError(f"{model_dir}: no agent here (expected {AGENT_META} and {AGENT_FILE}; "
                        "train one with `rlhf gym train`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with zipfile.ZipFile(zip_path) as zf:
            data = json.loads(zf.read("data"))
    except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile, KeyError):
        raise UserError(f"{model_dir}: {AGENT_FILE} or {AGENT_META} is not readable; "
                        "retrain with `rlhf gym train`") from None
    pickled = {k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v}
    if not pickled <= SERIALIZED_KEYS:
        raise UserError(f"{zip_path}: unexpected pickled entries {sorted(pickled - SERIALIZED_KEYS)}; refusing to load")
    const = float(meta["train"]["learning_rate"])
    custom = {"policy_class": ActorCriticPolicy, "observation_space": env.observation_space,
              "action_space": env.action_space, "rollout_buffer_class": RolloutBuffer,
              "clip_range": lambda _: 0.2, "lr_schedule": lambda _: const}
    try:
        model = PPO.load(zip_path, device="cpu", custom_objects=custom)
    except Exception as e:  # noqa: BLE001 - shapes that do not match, truncated tensors...
        raise UserError(f"{zip_path}: cannot load the agent ({type(e).__name__}: {e})") from None
    return model, meta


def _finish(output_dir: Path, returns: dict[str, list[float]], extra: dict[str, Any], title: str) -> dict[str, Any]:
    metrics = {**summarise(returns), **extra}
    atomic_write_json(output_dir / "eval_returns.json", returns)
    plot_returns(returns, output_dir / "returns.png", title)
    print(f"mean return: agent {metrics['mean_return']:.3f}, random {metrics['random_mean_return']:.3f}, "
          f"oracle {metrics['oracle_mean_return']:.3f}; gap closed {metrics['gap_closed']:.1%}")
    write_metrics(output_dir, metrics)
    return metrics


def run_train(cfg: GymTrainConfig) -> dict[str, Any]:
    from rlhf.training import torch_threads

    with torch_threads(cfg.torch_threads):
        return _train(cfg)


def _train(cfg: GymTrainConfig) -> dict[str, Any]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from rlhf.gym.chip_env import OBS_SCALE

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env_cfg = {"judge": cfg.judge, "ollama_model": cfg.ollama_model, "ollama_host": cfg.ollama_host,
               "ollama_cache": cfg.ollama_cache, "language": cfg.language,
               "env_csv": str(Path(cfg.env_csv).resolve()) if cfg.env_csv else "",  # eval may run elsewhere
               "obs_scale": OBS_SCALE.tolist()}
    judge = _judge_from(env_cfg)
    start_chips = _start_chips(env_cfg)
    if start_chips:  # ask an LLM judge about all starting states in one batch before training
        judge.prefetch([[w, ln, physics.power_mw(w, ln), physics.performance_score(w, ln)]
                        for _, w, ln in start_chips])
    make_env = make_env_factory(env_cfg, judge, start_chips)
    vec_env = make_vec_env(make_env, n_envs=cfg.n_envs, seed=cfg.seed)
    model = PPO("MlpPolicy", vec_env, learning_rate=cfg.learning_rate, n_steps=cfg.n_steps,
                batch_size=cfg.batch_size, n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
                ent_coef=cfg.ent_coef, policy_kwargs={"net_arch": list(cfg.net_arch)}, seed=cfg.seed,
                device="cpu", verbose=0)
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default logger leaves an empty /tmp/SB3-<date>
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.total_timesteps)
    train_seconds = time.perf_counter() - t0
    vec_env.close()
    _print_judge(judge)

    tmp = out / f".{AGENT_FILE}.tmp.zip"
    model.save(tmp, exclude=RUNTIME_STATE)  # runtime buffers would be pickled; they are not needed
    tmp.replace(out / AGENT_FILE)
    from rlhf.config import to_dict

    atomic_write_json(out / AGENT_META, {"format": "rlhf-gym-agent/1", "env": env_cfg, "train": to_dict(cfg)})
    print(f"trained {cfg.total_timesteps} steps in {train_seconds:.1f} s -> {out / AGENT_FILE}")

    returns = evaluate(model, make_env, cfg.eval_episodes, EVAL_SEED)
    extra = {"train_seconds": round(train_seconds, 2), "total_timesteps": cfg.total_timesteps,
             "eval_seed": EVAL_SEED, "seed": cfg.seed, "judge": judge.stats()}
    return _finish(out, returns, extra, f"chip env: PPO ({cfg.total_timesteps} steps) vs random vs oracle")


def run_eval(cfg: GymEvalConfig) -> dict[str, Any]:
    from rlhf.training import torch_threads

    with torch_threads(cfg.torch_threads):
        return _eval(cfg)


def _eval(cfg: GymEvalConfig) -> dict[str, Any]:
    meta_path = Path(cfg.model_dir) / AGENT_META
    try:
        env_cfg = json.loads(meta_path.read_text(encoding="utf-8"))["env"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{meta_path}: missing or unreadable; "
                        "point --model_dir at a folder from `rlhf gym train`") from None
    judge = _judge_from(env_cfg, cfg.ollama_host)
    make_env = make_env_factory(env_cfg, judge, _start_chips(env_cfg))
    probe = make_env()
    model, _ = load_agent(cfg.model_dir, probe)
    probe.close()
    out = Path(cfg.output_dir) if cfg.output_dir else Path(cfg.model_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    returns = evaluate(model, make_env, cfg.eval_episodes, cfg.seed)
    _print_judge(judge)
    extra = {"model_dir": str(cfg.model_dir), "eval_seed": cfg.seed, "judge": judge.stats()}
    return _finish(out, returns, extra, f"chip env: agent in {cfg.model_dir} vs random vs oracle")
