#!/usr/bin/env python
"""A seed study: one learning claim = a rate over seeds, from a command anyone can rerun.

    # N PPO seeds on one SFT + reward model (a finished pipeline run folder, e.g. runs/demo):
    python scripts/seed_study.py ppo --run runs/demo --seeds 0-9 --out runs/study-ppo
    # N whole pipelines (data, SFT, reward model and PPO all change with the seed):
    python scripts/seed_study.py pipeline --config configs/demo.yaml --seeds 0-4 --out runs/study-pipeline
    # the same with settings changed (any PPO key; pipeline mode takes SECTION.KEY=VALUE):
    python scripts/seed_study.py ppo --run runs/demo --seeds 0-9 --set score_baseline=none --out /tmp/s
    python scripts/seed_study.py pipeline --config configs/demo.yaml --seeds 0-4 --set reward.num_train_epochs=3

Each seed runs as its own `rlhf` process, one after another (never two at once: they would share the
cores), into OUT/seed-S; a seed whose metrics.json exists is read back, not rerun, so an interrupted
study continues. Printed and written to OUT/study.md and OUT/study.json: greedy and sampled agreement
before -> after PPO, KL at the end, the greedy action shares after, the collapse warning if any, and
wall seconds; then how many seeds cleared the lift (--lift, default +0.30) greedy and sampled, with KL
below --max-kl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,3,7' or '0-2,9' -> a list of ints."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    return seeds


def parse_sets(items: list[str], hint: str = "pipeline mode: SECTION.KEY=VALUE") -> dict[str, Any]:
    """['key=value', ...] -> {key: YAML value}; `hint` says what KEY names, in the error."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE ({hint})")
        out[key.strip()] = yaml.safe_load(value)
    return out


def ppo_config(run: Path, tmp: Path) -> Path:
    """The PPO stage's settings in a pipeline run folder: the pipeline's record (its `ppo` section and
    the shared keys) wired to the run's SFT model, reward model and data, as the pipeline wires them."""
    record = run / "rlhf_config.yaml"
    if not (record.is_file() and (run / "sft").is_dir() and (run / "reward").is_dir()):
        raise SystemExit(f"{run}: not a finished pipeline run folder (no rlhf_config.yaml, sft/ or reward/)")
    top = yaml.safe_load(record.read_text())
    cfg = {k: top[k] for k in ("dtype", "ollama_host") if top.get(k) is not None}
    cfg.update(top.get("ppo") or {})
    cfg.update(model=str(run / "sft"), reward_model=str(run / "reward"), data=str(run / "data"))
    path = tmp / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ppo_command(a: argparse.Namespace, seed: int, out: Path, sets: dict[str, Any], tmp: Path) -> list[str]:
    cmd = [sys.executable, "-m", "rlhf", "ppo", "--config", str(ppo_config(Path(a.run), tmp)), "--seed", str(seed),
           "--output_dir", str(out), "--resume", "false"]
    for key, value in sets.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return cmd


def pipeline_command(a: argparse.Namespace, seed: int, out: Path, sets: dict[str, Any], tmp: Path) -> list[str]:
    cfg = yaml.safe_load(Path(a.config).read_text()) or {}
    for key, value in sets.items():
        section, dot, name = key.partition(".")
        if dot:
            cfg.setdefault(section, {})[name] = value
        else:
            cfg[key] = value
    path = tmp / f"pipeline-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "rlhf", "pipeline", "--config", str(path), "--seed", str(seed),
            "--output_dir", str(out)]


def read_result(seed: int, out: Path, mode: str, wall: float | None) -> dict[str, Any]:
    ppo_dir = out if mode == "ppo" else out / "ppo"
    m = json.loads((ppo_dir / "metrics.json").read_text())
    return {
        "seed": seed,
        "greedy_before": m["agreement_before"], "greedy_after": m["agreement_after"],
        "sampled_before": m["agreement_sampled_before"], "sampled_after": m["agreement_sampled_after"],
        "kl": m["kl_final"], "actions_after": m.get("action_share_after") or {},
        "collapse": (m.get("collapse_warning") or {}).get("update"),
        "ppo_seconds": m.get("wall_seconds"), "wall_seconds": wall,
    }


def cleared(r: dict[str, Any], lift: float, max_kl: float) -> bool:
    return (r["greedy_after"] - r["greedy_before"] >= lift and r["sampled_after"] - r["sampled_before"] >= lift
            and r["kl"] < max_kl)


def table(results: list[dict[str, Any]], lift: float, max_kl: float) -> str:
    lines = ["| seed | greedy | sampled | KL | greedy actions after | collapse at | PPO s | wall s | cleared |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        acts = ", ".join(f"{k} {v:.2f}" for k, v in r["actions_after"].items())
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] is not None else "(earlier run)"
        lines.append(f"| {r['seed']} | {r['greedy_before']:.2f} -> {r['greedy_after']:.2f} | "
                     f"{r['sampled_before']:.2f} -> {r['sampled_after']:.2f} | {r['kl']:.2f} | {acts} | "
                     f"{r['collapse'] or '-'} | {r['ppo_seconds']:.0f} | {wall} | "
                     f"{'yes' if cleared(r, lift, max_kl) else 'no'} |")
    n = sum(cleared(r, lift, max_kl) for r in results)
    gains = [r["greedy_after"] - r["greedy_before"] for r in results]
    sgains = [r["sampled_after"] - r["sampled_before"] for r in results]
    worst = max((max(r["actions_after"].values(), default=0.0) for r in results), default=0.0)
    lines += ["", f"{n} of {len(results)} seeds cleared +{lift:.2f} greedy and sampled with KL < {max_kl:g}. "
              f"Mean lift greedy {sum(gains) / len(gains):+.3f}, sampled {sum(sgains) / len(sgains):+.3f}; "
              f"largest greedy action share after: {worst:.2f}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["ppo", "pipeline"])
    ap.add_argument("--run", help="ppo mode: a finished pipeline run folder (its sft/, reward/, data/, ppo/)")
    ap.add_argument("--config", default="configs/demo.yaml", help="pipeline mode: the pipeline YAML")
    ap.add_argument("--seeds", default="0-4", help="e.g. 0-9 or 0,3,7")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    ap.add_argument("--out", required=True, help="study folder: seed-S/ per seed, study.md, study.json")
    ap.add_argument("--lift", type=float, default=0.30, help="agreement lift a seed must clear")
    ap.add_argument("--max-kl", type=float, default=5.0, help="KL (nats) a seed must stay under")
    a = ap.parse_args()
    if a.mode == "ppo" and not a.run:
        ap.error("ppo mode needs --run RUN_FOLDER")
    seeds, sets = parse_seeds(a.seeds), parse_sets(a.set)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    with tempfile.TemporaryDirectory(prefix="seed-study-") as tmp:
        for seed in seeds:
            run_dir = out / f"seed-{seed}"
            done = (run_dir if a.mode == "ppo" else run_dir / "ppo") / "metrics.json"
            wall = None
            if not done.is_file():
                cmd = (ppo_command(a, seed, run_dir, sets, Path(tmp)) if a.mode == "ppo"
                       else pipeline_command(a, seed, run_dir, sets, Path(tmp)))
                print(f"== seed {seed}: {' '.join(cmd[1:])}", flush=True)
                t = time.perf_counter()
                with open(out / f"seed-{seed}.log", "w", encoding="utf-8") as log:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
                wall = time.perf_counter() - t
                if rc:
                    print(f"   seed {seed} failed (exit {rc}); see {out / f'seed-{seed}.log'}", flush=True)
                    continue
            r = read_result(seed, run_dir, a.mode, wall)
            results.append(r)
            print(f"   greedy {r['greedy_before']:.2f} -> {r['greedy_after']:.2f}, sampled {r['sampled_before']:.2f}"
                  f" -> {r['sampled_after']:.2f}, KL {r['kl']:.2f}", flush=True)
    if not results:
        print("no seed finished", file=sys.stderr)
        return 1
    text = (f"Command: `python scripts/seed_study.py {' '.join(sys.argv[1:])}`\n\n"
            + table(results, a.lift, a.max_kl))
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
