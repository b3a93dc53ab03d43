"""The chip model of the `env` variant (the Gym track): power and performance as functions of a
chip's width and length, the "optimal action" derived from it, and the judge prompt (en/zh).

The seed's environment read power and performance from a CSV and never updated them, so actions
could not change the reward. Here both follow width and length through a small documented model:

    area        A      = width_nm * length_nm / 1000            (in 10^3 nm^2)
    power       P      = P_LEAK + P_DYN * A                     mW: leakage floor + switching power
                                                                 that grows linearly with area
    capacity    c      = 1 - exp(-A / A_SAT)                    more area, more units, with
                                                                 diminishing returns (saturates)
    density     rho    = P / A                                  mW per 10^3 nm^2: the leakage floor
                                                                 concentrates heat in small dies
    throttle    t      = 1 / (1 + (max(0, rho - RHO_SAFE) / RHO_SCALE)^2)
                                                                 hot dies clock down
    wire        w      = exp(-K_ASPECT * (max(W, L) / min(W, L) - 1))
                                                                 long thin dies have long critical
                                                                 paths and hot spots
    performance S      = 100 * c * t * w                        score in [0, 100]

So power grows strictly with width and with length; performance saturates with area, suffers from
thermal density (small dies) and from elongation (aspect ratio).

The figure of merit is the seed's rule reward `merit = S / 100 - P / 500`; it is highest for a
roughly square die of about 55 x 55 nm. The optimal action is the one whose next state (after the
5 nm step and the 5 nm floor) has the highest merit; ties go to the lower action index.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Actions of the env variant (the seed's numbering).
ACTION_NAMES: tuple[str, ...] = ("increase width", "decrease width", "increase length", "decrease length")
ACTION_NAMES_ZH: tuple[str, ...] = ("增加宽度", "减少宽度", "增加长度", "减少长度")
N_ACTIONS = 4
STEP_NM = 5.0
FLOOR_NM = 5.0
CEILING_NM = 1000.0  # the model's range ends here (keeps the observation space bounded)

P_LEAK = 20.0  # mW
P_DYN = 60.0  # mW per 10^3 nm^2
A_SAT = 3.0  # 10^3 nm^2
RHO_SAFE = 80.0  # mW per 10^3 nm^2
RHO_SCALE = 80.0
K_ASPECT = 0.12

# Starting chips: integer sides in this range, performance below the episode's target, so an
# episode never starts already "done".
SIDE_MIN, SIDE_MAX = 10, 120
TARGET_PERFORMANCE = 95.0


@dataclass(frozen=True)
class ChipState:
    width_nm: float
    length_nm: float

    @property
    def power_mw(self) -> float:
        return power_mw(self.width_nm, self.length_nm)

    @property
    def performance_score(self) -> float:
        return performance_score(self.width_nm, self.length_nm)

    def observation(self) -> list[float]:
        """[width_nm, length_nm, power_mw, performance_score], the env's observation."""
        return [self.width_nm, self.length_nm, self.power_mw, self.performance_score]


def _check(width_nm: float, length_nm: float) -> None:
    if not (width_nm > 0 and length_nm > 0) or math.isinf(width_nm) or math.isinf(length_nm):
        raise ValueError(f"width_nm and length_nm must be positive and finite, got {width_nm!r}, {length_nm!r}")


def area(width_nm: float, length_nm: float) -> float:
    return width_nm * length_nm / 1000.0


def power_mw(width_nm: float, length_nm: float) -> float:
    _check(width_nm, length_nm)
    return P_LEAK + P_DYN * area(width_nm, length_nm)


def thermal_density(width_nm: float, length_nm: float) -> float:
    return power_mw(width_nm, length_nm) / area(width_nm, length_nm)


def performance_score(width_nm: float, length_nm: float) -> float:
    _check(width_nm, length_nm)
    a = area(width_nm, length_nm)
    capacity = 1.0 - math.exp(-a / A_SAT)
    excess = max(0.0, thermal_density(width_nm, length_nm) - RHO_SAFE) / RHO_SCALE
    throttle = 1.0 / (1.0 + excess * excess)
    aspect = max(width_nm, length_nm) / min(width_nm, length_nm)
    wire = math.exp(-K_ASPECT * (aspect - 1.0))
    return 100.0 * capacity * throttle * wire


def merit(width_nm: float, length_nm: float) -> float:
    """The seed's rule reward: performance / 100 - power / 500 (higher is better)."""
    return performance_score(width_nm, length_nm) / 100.0 - power_mw(width_nm, length_nm) / 500.0


def apply_action(width_nm: float, length_nm: float, action: int) -> tuple[float, float]:
    """The state after `action`: +-5 nm on one side, never below the 5 nm floor (nor above the
    1000 nm ceiling of the model's range)."""
    if action == 0:
        return min(CEILING_NM, width_nm + STEP_NM), length_nm
    if action == 1:
        return max(FLOOR_NM, width_nm - STEP_NM), length_nm
    if action == 2:
        return width_nm, min(CEILING_NM, length_nm + STEP_NM)
    if action == 3:
        return width_nm, max(FLOOR_NM, length_nm - STEP_NM)
    raise ValueError(f"action must be 0..3, got {action!r}")


def action_merits(width_nm: float, length_nm: float) -> list[float]:
    """Merit of the next state for each of the 4 actions."""
    return [merit(*apply_action(width_nm, length_nm, a)) for a in range(N_ACTIONS)]


def optimal_action(state: ChipState | tuple[float, float] | list[float]) -> int:
    """The action whose next state has the highest merit (ties: lowest index).

    `state` is a ChipState, (width_nm, length_nm) or an observation [width, length, power, perf]
    (power and performance are ignored: the model recomputes them)."""
    w, ln = (state.width_nm, state.length_nm) if isinstance(state, ChipState) else (float(state[0]), float(state[1]))
    merits = action_merits(w, ln)
    return max(range(N_ACTIONS), key=lambda a: (merits[a], -a))


def action_score(width_nm: float, length_nm: float, action: int) -> float:
    """The chip model's own judgement of an action in [0, 1]: 1 for the best next state, 0 for
    the worst, linear in merit between (0.5 when all actions are equal)."""
    merits = action_merits(width_nm, length_nm)
    lo, hi = min(merits), max(merits)
    if hi - lo < 1e-12:
        return 0.5
    return (merits[action] - lo) / (hi - lo)


def sample_chips(n: int, seed: int) -> list[ChipState]:
    """`n` starting chips with integer sides in [SIDE_MIN, SIDE_MAX] and performance below the
    target; the same seed gives the same list."""
    rng = random.Random(seed)
    out: list[ChipState] = []
    while len(out) < n:
        chip = ChipState(float(rng.randint(SIDE_MIN, SIDE_MAX)), float(rng.randint(SIDE_MIN, SIDE_MAX)))
        if chip.performance_score < TARGET_PERFORMANCE:
            out.append(chip)
    return out


# The judge's prompt: the seed's Chinese prompt, with English beside it, asking for a JSON score.
JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}, "reason": {"type": "string"}},
    "required": ["score"],
}

JUDGE_TEMPLATES = {
    "en": ("Chip: width={w:.1f} nm, length={l:.1f} nm, power={p:.1f} mW, performance score={s:.1f}. "
           "Proposed action: {a} ({name}; 0 increase width, 1 decrease width, 2 increase length, "
           "3 decrease length; step 5 nm). Goal: high performance at low power. Rate how much this "
           'action improves the chip as JSON {{"score": a number from 0 to 1 (1 = best), "reason": "..."}}.'),
    "zh": ("芯片参数:宽度={w:.1f}nm, 长度={l:.1f}nm, 功耗={p:.1f}mW, 性能评分={s:.1f}, "
           "动作={a}({name};0: 增加宽度, 1: 减少宽度, 2: 增加长度, 3: 减少长度,步长 5nm)。"
           "目标:高性能、低功耗。请评估该动作的优化效果,输出 JSON "
           '{{"score": 0 到 1 的评分(1 表示最佳优化), "reason": "理由"}}。'),
}


def judge_prompt(observation: list[float] | tuple[float, ...], action: int, language: str = "en") -> str:
    if language not in JUDGE_TEMPLATES:
        raise ValueError(f"language must be one of {', '.join(JUDGE_TEMPLATES)}, got {language!r}")
    w, ln, p, s = (float(x) for x in observation[:4])
    names = ACTION_NAMES_ZH if language == "zh" else ACTION_NAMES
    return JUDGE_TEMPLATES[language].format(w=w, l=ln, p=p, s=s, a=int(action), name=names[int(action)])
