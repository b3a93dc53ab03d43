"""The chip environment (gymnasium): resize a chip by 5 nm steps towards high performance at low power.

Observation: float32 [width_nm, length_nm, power_mw, performance_score]; power and performance are
recomputed from width and length by the chip model (`rlhf.chips.physics`) after every step, so
actions change what the agent sees and earns (the seed's env never updated them).
Actions: 0 increase width, 1 decrease width, 2 increase length, 3 decrease length (5 nm, floor 5 nm).
Episode: 10 steps (truncated), terminated early once performance >= 95.
Reward of a step, as in the seed but on the new state:
    0.7 * (performance / 100 - power / 500)       rule reward of the state the action leads to
  + 0.3 * judge(state, action)                     in [0, 1] (see rlhf.gym.judge)
  + 0.2 if action == the chip model's optimal action in the state where it was taken
Starting chips: sampled with the env's seeded RNG, or drawn from an env CSV (`start_chips`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rlhf.chips import physics
from rlhf.gym.judge import Judge, ModelJudge

RULE_WEIGHT, JUDGE_WEIGHT, OPTIMAL_BONUS = 0.7, 0.3, 0.2
MAX_STEPS = 10

# Fixed observation scaling for the policy: sides ~10..170 nm, power ~20..1800 mW, score 0..100.
OBS_SCALE = np.array([100.0, 100.0, 500.0, 100.0], dtype=np.float32)


class ChipEnv(gym.Env):
    metadata = {"render_modes": ["ansi"]}

    def __init__(self, judge: Judge | None = None, start_chips: list[tuple[str, float, float]] | None = None,
                 max_steps: int = MAX_STEPS, rule_weight: float = RULE_WEIGHT, judge_weight: float = JUDGE_WEIGHT,
                 optimal_bonus: float = OPTIMAL_BONUS, render_mode: str | None = None) -> None:
        self.judge = judge if judge is not None else ModelJudge()
        self.start_chips = list(start_chips) if start_chips else None
        self.max_steps = max_steps
        self.rule_weight, self.judge_weight, self.optimal_bonus = rule_weight, judge_weight, optimal_bonus
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(physics.N_ACTIONS)
        low = np.array([physics.FLOOR_NM, physics.FLOOR_NM, 0.0, 0.0], dtype=np.float32)
        top = physics.CEILING_NM
        high = np.array([top, top, physics.power_mw(top, top), 100.0], dtype=np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.chip_id = ""
        self.width = self.length = physics.SIDE_MIN * 1.0
        self.steps = 0

    def _obs(self) -> np.ndarray:
        obs = np.array([self.width, self.length, physics.power_mw(self.width, self.length),
                        physics.performance_score(self.width, self.length)], dtype=np.float32)
        return np.minimum(obs, self.observation_space.high)  # float32 rounding may touch 100.00001

    def _info(self) -> dict[str, Any]:
        return {"chip_id": self.chip_id, "optimal_action": physics.optimal_action((self.width, self.length))}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = options or {}
        if "chip" in options:  # an explicit start (tests, demos): (width_nm, length_nm)
            w, ln = (float(v) for v in options["chip"])
            self.chip_id = str(options.get("chip_id", "custom"))
        elif self.start_chips:
            self.chip_id, w, ln = self.start_chips[int(self.np_random.integers(len(self.start_chips)))]
        else:
            while True:  # never start an episode already at the target
                w = float(self.np_random.integers(physics.SIDE_MIN, physics.SIDE_MAX + 1))
                ln = float(self.np_random.integers(physics.SIDE_MIN, physics.SIDE_MAX + 1))
                if physics.performance_score(w, ln) < physics.TARGET_PERFORMANCE:
                    break
            self.chip_id = f"sampled-{int(w)}x{int(ln)}"
        if not (physics.FLOOR_NM <= w <= physics.CEILING_NM and physics.FLOOR_NM <= ln <= physics.CEILING_NM):
            raise ValueError(f"chip {self.chip_id}: sides {w} x {ln} nm are outside the model's range "
                             f"{physics.FLOOR_NM:g}..{physics.CEILING_NM:g} nm")
        self.width, self.length = w, ln
        self.steps = 0
        return self._obs(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = int(action)
        if not self.action_space.contains(a):
            raise ValueError(f"action must be 0..3, got {action!r}")
        before = self._obs()
        optimal = physics.optimal_action((self.width, self.length))
        judge = self.judge.score(before, a) if self.judge_weight else 0.0
        self.width, self.length = physics.apply_action(self.width, self.length, a)
        self.steps += 1
        rule = physics.merit(self.width, self.length)
        bonus = self.optimal_bonus if a == optimal else 0.0
        reward = self.rule_weight * rule + self.judge_weight * judge + bonus
        obs = self._obs()
        terminated = bool(physics.performance_score(self.width, self.length) >= physics.TARGET_PERFORMANCE)
        truncated = bool(not terminated and self.steps >= self.max_steps)
        info = {**self._info(), "rule_reward": rule, "judge_reward": judge, "bonus": bonus,
                "action_was_optimal": a == optimal}
        return obs, float(reward), terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            w, ln, p, s = self._obs()
            return f"chip {self.chip_id}: {w:.0f} x {ln:.0f} nm, {p:.1f} mW, score {s:.1f}, step {self.steps}"
        return None


class ScaledObservation(gym.ObservationWrapper):
    """Divide observations by fixed scales, so the MLP sees values of order 1 (no running
    statistics to save or to drift: the scales are constants stored with the agent)."""

    def __init__(self, env: gym.Env, scale: np.ndarray | list[float] = OBS_SCALE) -> None:
        super().__init__(env)
        self.scale = np.asarray(scale, dtype=np.float32)
        box = env.observation_space
        assert isinstance(box, spaces.Box)
        self.observation_space = spaces.Box(box.low / self.scale, box.high / self.scale, dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return (observation / self.scale).astype(np.float32)
