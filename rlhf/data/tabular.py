"""Write the seed's tabular CSVs (offline, deterministic for a seed).

--variant dims: chip_dimension_reward_dataset.csv with `length,width,height,action`, labelled by
  the rule teacher (`rlhf.chips.rule_action`), for `rlhf tabular train`.
--variant env:  chip_ppo_dataset.csv with
  `chip_id,width_nm,length_nm,power_mw,performance_score,optimal_action`, computed from the chip
  model (`rlhf.chips.physics`), as starting chips for `rlhf gym train --env_csv`.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.chips import physics, rule_action, sample_specs
from rlhf.config import SEED, field
from rlhf.errors import UserError
from rlhf.io import atomic_write_text, write_metrics

DIMS_FILE = "chip_dimension_reward_dataset.csv"
ENV_FILE = "chip_ppo_dataset.csv"
DIMS_COLUMNS = ("length", "width", "height", "action")
ENV_COLUMNS = ("chip_id", "width_nm", "length_nm", "power_mw", "performance_score", "optimal_action")


@dataclass
class TabularDataConfig:
    output_dir: str = field("runs/tabular", help="folder for the CSV and metrics.json")
    variant: Literal["dims", "env"] = field("dims", help="dims: length,width,height,action; env: chip PPO dataset")
    n: int = field(1000, help="number of rows (the seed used 1000)", min=1)
    seed: int = field(42, help="sampling seed: the same seed writes the same file", **SEED)

    def validate(self) -> None:
        if self.variant == "dims" and self.n > 100**3:
            raise UserError(f"--n {self.n}: the dims variant has only {100**3} distinct chips")


def dims_rows(n: int, seed: int) -> list[dict[str, Any]]:
    return [{"length": s.length, "width": s.width, "height": s.height, "action": rule_action(s)}
            for s in sample_specs(n, seed)]


def env_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for i, chip in enumerate(physics.sample_chips(n, seed)):
        rows.append({
            "chip_id": i,
            "width_nm": chip.width_nm,
            "length_nm": chip.length_nm,
            "power_mw": round(chip.power_mw, 4),
            "performance_score": round(chip.performance_score, 4),
            "optimal_action": physics.optimal_action(chip),
        })
    return rows


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run(cfg: TabularDataConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    if cfg.variant == "dims":
        rows, columns, name, label = dims_rows(cfg.n, cfg.seed), DIMS_COLUMNS, DIMS_FILE, "action"
    else:
        rows, columns, name, label = env_rows(cfg.n, cfg.seed), ENV_COLUMNS, ENV_FILE, "optimal_action"
    path = out / name
    atomic_write_text(path, to_csv(rows, columns))
    counts = Counter(str(r[label]) for r in rows)
    metrics = {"variant": cfg.variant, "file": str(path), "rows": len(rows), "seed": cfg.seed,
               "label_counts": dict(sorted(counts.items()))}
    print(f"wrote {len(rows)} rows to {path} ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})")
    write_metrics(out, metrics)
    return metrics


# -- readers: one place that knows the formats, errors name file, line and column --------------

def _read_rows(path: str | Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (write one with `rlhf data tabular --output_dir DIR`)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}: missing column '{missing[0]}' (header is {','.join(header) or 'empty'}; "
                        f"expected {','.join(required)})")
    reader.fieldnames = header
    rows = []
    for i, row in enumerate(reader, start=2):  # line 1 is the header
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        rows.append((i, {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)}))
    if not rows:
        raise UserError(f"{path}: no data rows")
    return rows


def _number(path: Path | str, line: int, column: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise UserError(f"{path}: line {line}, column '{column}': expected a number, got {value!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise UserError(f"{path}: line {line}, column '{column}': expected a finite number, got {value!r}")
    return x


def read_dims_csv(path: str | Path, actions: tuple[str, ...]) -> tuple[list[list[float]], list[str]]:
    """Features [[length, width, height], ...] and action labels of a dims CSV, checked cell by cell."""
    xs: list[list[float]] = []
    ys: list[str] = []
    for line, row in _read_rows(path, DIMS_COLUMNS):
        xs.append([_number(path, line, c, row[c]) for c in ("length", "width", "height")])
        action = row["action"]
        if action not in actions:
            raise UserError(f"{path}: line {line}, column 'action': unknown action {action!r} "
                            f"(expected one of {', '.join(actions)})")
        ys.append(action)
    return xs, ys


def read_env_csv(path: str | Path) -> list[tuple[str, float, float]]:
    """(chip_id, width_nm, length_nm) of an env CSV. Power and performance are not read: the chip
    model recomputes them from the sides, so a stale column cannot disagree with the env."""
    chips = []
    for line, row in _read_rows(path, ("chip_id", "width_nm", "length_nm")):
        w = _number(path, line, "width_nm", row["width_nm"])
        ln = _number(path, line, "length_nm", row["length_nm"])
        for name, v in (("width_nm", w), ("length_nm", ln)):
            if not physics.FLOOR_NM <= v <= physics.CEILING_NM:
                raise UserError(f"{path}: line {line}, column '{name}': {v} is outside the chip model's range "
                                f"{physics.FLOOR_NM:g}..{physics.CEILING_NM:g} nm")
        chips.append((row["chip_id"], w, ln))
    return chips
