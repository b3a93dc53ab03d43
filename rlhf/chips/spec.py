"""Chip specs of the `dims` variant and their deterministic sampling."""

from __future__ import annotations

import random
from dataclasses import dataclass

DIM_MIN, DIM_MAX = 1, 100


@dataclass(frozen=True, order=True)
class ChipSpec:
    """A chip's [length, width, height] in mm."""

    length: int
    width: int
    height: int

    def as_list(self) -> list[int]:
        return [self.length, self.width, self.height]

    def key(self) -> str:
        return f"{self.length}x{self.width}x{self.height}"


def sample_specs(n: int, seed: int, *, exclude: set[ChipSpec] | None = None,
                 lo: int = DIM_MIN, hi: int = DIM_MAX) -> list[ChipSpec]:
    """`n` distinct chips drawn uniformly from [lo, hi]^3; the same seed gives the same list.

    The stream is a pure function of the seed, so a resumed run regenerates the same chips and
    can skip those already written."""
    if n > (hi - lo + 1) ** 3:
        raise ValueError(f"cannot draw {n} distinct chips from [{lo}, {hi}]^3")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[ChipSpec] = []
    while len(out) < n:
        spec = ChipSpec(rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))
        if spec not in seen:
            seen.add(spec)
            out.append(spec)
    return out
