#!/usr/bin/env python
"""Our PPO against TRL 1.12's, side by side: same models, prompts, batch, epochs, response length, episodes.

    python scripts/bench_ppo_vs_trl.py --size both --repeats 3 --out runs/bench
    python scripts/bench_ppo_vs_trl.py --size tiny --variants full,lora --episodes 64 --out /tmp/bench  # quick

Each run is its own subprocess, one after the other (TRL first, then ours, per repeat), so peak RSS and
timings are comparable: peak RSS is the child's own `ru_maxrss` from wait4(). TRL runs in a separate venv
(trl==1.12.0, the last release with PPO) that this script creates on first use; its runner is
`scripts/bench_trl112_runner.py`. The anchor is TRL with gc.freeze() before training (TRL 1.12 calls
gc.collect() twice per update, ~0.2 s each, which would otherwise dominate); `--trl-stock` adds stock TRL.
The models are the shared bench's (`../shared/bench/{tiny,small}_qwen`: policy/, reward/, prompts.jsonl).

Printed and written to --out (bench.json, bench.md, one JSON and log per run): episodes/s, tokens/s (response
tokens kept, up to and including the stop token, per training second), peak RSS, training seconds, score
start -> end and KL at the end (means over the first/last quarter of updates, at most 4), ratios ours/TRL,
and where our time goes (metrics.json `time_split_seconds`). With --repeats N the run with the median
episodes/s is reported (for even N the slower middle one), with every run's episodes/s listed.
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
from bench_settings import add_bench_settings, bench_settings_argv

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BENCH = REPO.parent / "shared" / "bench"
DEFAULT_VENV = Path.home() / ".cache" / "rlhf" / "venv-trl112"
RUNNER = Path(__file__).resolve().with_name("bench_trl112_runner.py")
TRL_PACKAGES = ["torch==2.13.0", "trl==1.12.0", "peft", "datasets", "accelerate"]
SIZES = {"tiny": "tiny_qwen", "small": "small_qwen"}


def ensure_trl_venv(venv: Path) -> Path:
    """The TRL 1.12 venv, created on first use (pip's local caches make this quick)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != '1.12.0')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating the TRL 1.12 venv in {venv} ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *TRL_PACKAGES], check=True)
    if subprocess.run(probe, capture_output=True).returncode:
        raise SystemExit(f"{venv}: trl 1.12.0 did not install; see pip's output above")
    return python


def run_child(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, float]:
    """(exit code, peak RSS in MB of this child alone, wall seconds)."""
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - t  # Linux: ru_maxrss in KiB


def window_mean(values: list[float], head: bool) -> float:
    k = max(1, min(4, len(values) // 4))  # same window as the TRL runner
    part = values[:k] if head else values[-k:]
    return sum(part) / len(part)


def run_trl(python: Path, model_dir: Path, a: argparse.Namespace, lora: bool, gc_freeze: bool, tag: str,
            out: Path, env: dict[str, str], seed: int) -> dict[str, Any]:
    res_path = out / f"{tag}.json"
    cmd = [str(python), str(RUNNER), "--model-dir", str(model_dir), *bench_settings_argv(a),
           "--seed", str(seed), "--threads", str(a.threads),
           "--lora-r", str(a.lora_r if lora else 0), "--json-out", str(res_path)]
    if gc_freeze:
        cmd.append("--gc-freeze")
    rc, rss, wall = run_child(cmd, out / f"{tag}.log", env)
    if rc:
        raise SystemExit(f"TRL run {tag} failed (exit {rc}); see {out / f'{tag}.log'}")
    res = json.loads(res_path.read_text())
    res.update(peak_rss_mb=rss, process_seconds=wall, seed=seed)
    return res


# The bench's reward model was regressed on "...<|im_start|>assistant\n" + answer + "<|im_end|>", read at
# <|im_end|> (as TRL scores token ids). Our reward source renders the conversation with the chat template,
# which appends "\n" after <|im_end|>: the model would be read one token late, out of distribution (every
# score near -1). So our runs get the same weights with a template that ends the last answer at <|im_end|>.
TRL_LIKE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% if not loop.last or message['role'] != 'assistant' %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def reward_as_trained(src: Path, dst: Path) -> Path:
    """`src` with links to its files, except a chat template that scores where the reward model was trained to."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "chat_template.jinja":
            (dst / f.name).symlink_to(f.resolve())
    (dst / "chat_template.jinja").write_text(TRL_LIKE_TEMPLATE)
    return dst


def run_ours(model_dir: Path, a: argparse.Namespace, lora: bool, tag: str, out: Path,
             env: dict[str, str], seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        rows = [json.loads(line) for line in (model_dir / "prompts.jsonl").read_text().splitlines() if line.strip()]
        (data / "train.jsonl").write_text("".join(json.dumps({"prompt": r["messages"]}) + "\n" for r in rows))
        run_dir = Path(tmp) / "run"
        reward = reward_as_trained(model_dir / "reward", Path(tmp) / "reward")
        cfg = {
            "model": str(model_dir / "policy"), "reward_model": str(reward),
            "value_model": str(model_dir / "reward"), "data": str(data), "output_dir": str(run_dir),
            "total_episodes": a.episodes, "batch_size": a.batch_size, "num_ppo_epochs": a.ppo_epochs,
            "num_mini_batches": 1, "response_length": a.response_length, "learning_rate": a.lr,
            "kl_coef": a.kl_coef, "temperature": a.temperature, "stop_token": "eos", "dtype": "float32",
            "use_lora": lora, "lora_r": a.lora_r, "lora_alpha": 2 * a.lora_r, "lora_dropout": 0.0,
            "rewards": {"model": 1.0},
            "normalize_reward": False,  # TRL feeds the raw reward-model score
            "missing_eos_penalty": 0.0,  # TRL 1.12's default is None: no penalty
            # TRL 1.12's PPO never clips (it steps straight after backward). Our default clip at 1.0 cut half
            # of the tiny bench's steps, and with Adam that raises the typical step: over 30 tiny seeds it gave
            # more gain and KL > 3 on 3 runs against TRL's 1; unclipped, ours matched TRL (README, bench)
            "max_grad_norm": 0.0,
            "eval_prompts": 0, "save_every": 0, "sample_every": 0, "report_to": "none", "resume": False,
            "lr_schedule": "linear", "seed": seed,
            "value_head_init": a.value_head_init,
            "score_unfinished": a.score_unfinished,
        }
        for item in a.ours_set:  # experiments: any of our PPO keys, e.g. max_grad_norm=1.0
            key, _, value = item.partition("=")
            cfg[key] = yaml.safe_load(value)
        cfg_path = Path(tmp) / "ppo.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        rc, rss, wall = run_child([sys.executable, "-m", "rlhf", "ppo", "--config", str(cfg_path)],
                                  out / f"{tag}.log", env)
        if rc:
            raise SystemExit(f"our run {tag} failed (exit {rc}); see {out / f'{tag}.log'}")
        m = json.loads((run_dir / "metrics.json").read_text())
        log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scores, kls = [r["score_mean"] for r in log], [r["kl"] for r in log]
    res = {
        "side": "ours", "updates": m["updates"], "episodes": m["episodes"],
        "train_seconds": m["train_seconds_this_run"], "episodes_per_second": m["episodes_per_second"],
        "tokens_per_second": m["tokens_per_second"], "time_split_seconds": m["time_split_seconds"],
        "score_start": window_mean(scores, True), "score_end": window_mean(scores, False),
        "kl_start": window_mean(kls, True), "kl_end": window_mean(kls, False),
        "peak_rss_mb": rss, "process_seconds": wall, "seed": seed,
    }
    (out / f"{tag}.json").write_text(json.dumps(res, indent=1))
    return res


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median episodes/s (for an even count, the slower middle one), plus the score
    gain (end - start) per seed, their mean and spread, and how many seeds ended with KL > 3."""
    ranked = sorted(runs, key=lambda r: r["episodes_per_second"])
    pick = dict(ranked[(len(ranked) - 1) // 2])
    pick["episodes_per_second_all_runs"] = [round(r["episodes_per_second"], 2) for r in runs]
    by_seed = {r["seed"]: r for r in runs}  # repeats of a seed give the same scores: one per seed
    gains = [r["score_end"] - r["score_start"] for r in by_seed.values()]
    mean = sum(gains) / len(gains)
    pick["gain_by_seed"] = {seed: round(g, 3) for seed, g in zip(by_seed, gains)}
    pick["gain_mean"] = mean
    pick["gain_sd"] = (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5 if len(gains) > 1 else 0.0
    pick["seeds_kl_over_3"] = sum(r["kl_end"] > 3 for r in by_seed.values())
    return pick


ROWS = [  # (label, key, format)
    ("episodes/s", "episodes_per_second", "{:.1f}"),
    ("tokens/s", "tokens_per_second", "{:.1f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ("train seconds", "train_seconds", "{:.2f}"),
    ("process seconds", "process_seconds", "{:.1f}"),
]


def markdown(case: str, sides: dict[str, dict[str, Any]]) -> str:
    names = list(sides)
    head = f"### {case}\n\n| | " + " | ".join(names) + " | ours / TRL gc-frozen |\n|---|" + "---|" * (len(names) + 1)
    lines = [head]
    ours, anchor = sides["ours"], sides["TRL 1.12 gc-frozen"]
    for label, key, fmt in ROWS:
        cells = [fmt.format(sides[n][key]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ours[key] / anchor[key]:.2f}x |")
    n_seeds = len(ours["gain_by_seed"])
    if n_seeds == 1:
        cells = [f"{sides[n]['score_start']:+.3f} -> {sides[n]['score_end']:+.3f}" for n in names]
        gain = (ours["score_end"] - ours["score_start"]) / (anchor["score_end"] - anchor["score_start"] or float("nan"))
        lines.append("| score start -> end | " + " | ".join(cells) + f" | gain {gain:.2f}x |")
        lines.append("| KL end | " + " | ".join(f"{sides[n]['kl_end']:.3f}" for n in names) + " | |")
    else:
        cells = [f"{sides[n]['gain_mean']:+.3f} ({sides[n]['gain_sd']:.3f})" for n in names]
        lines.append(f"| score gain, mean over {n_seeds} seeds (sd) | " + " | ".join(cells)
                     + f" | {ours['gain_mean'] - anchor['gain_mean']:+.3f} |")
        lines.append("| score gain by seed | " + " | ".join(
            ", ".join(f"{g:+.2f}" for g in sides[n]["gain_by_seed"].values()) for n in names) + " | |")
        lines.append(f"| seeds ending with KL > 3 (of {n_seeds}) | "
                     + " | ".join(str(sides[n]["seeds_kl_over_3"]) for n in names) + " | |")
    lines.append("| episodes/s, every run | " + " | ".join(
        ", ".join(f"{x:.1f}" for x in sides[n]["episodes_per_second_all_runs"]) for n in names) + " | |")
    split = ours["time_split_seconds"]
    total = ours["train_seconds"] or 1.0
    parts = ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in split.items())
    gen = sides["TRL 1.12 gc-frozen"].get("generate_seconds")
    lines.append(f"\nOur time split ({total:.2f} s in the loop): {parts}."
                 + (f" TRL's generation: {gen:.2f} s." if gen is not None else ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small", "both"], default="both")
    ap.add_argument("--variants", default="full", help="comma-separated: full, lora (LoRA r=--lora-r on the policy)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side; the median run is reported")
    ap.add_argument("--trl-stock", action="store_true", help="also run stock TRL (no gc.freeze(); ~5x slower)")
    ap.add_argument("--out", default="runs/bench-ppo-vs-trl", help="bench.json, bench.md, per-run JSON and logs")
    ap.add_argument("--bench-dir", default=str(DEFAULT_BENCH), help="folder with tiny_qwen/ and small_qwen/")
    ap.add_argument("--trl-venv", default=str(DEFAULT_VENV), help="venv with trl==1.12.0 (created if missing)")
    add_bench_settings(ap)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--seeds", default="42", help="comma-separated; every seed runs --repeats times per side; "
                    "with several, the score gain is reported as a mean over seeds (one seed is one sample of "
                    "a chaotic process: the same code can gain +0.8 or lose)")
    ap.add_argument("--value-head-init", default="reward", choices=["reward", "zero"],
                    help="our value head's start; 'reward' is what TRL does (the default here, for parity)")
    ap.add_argument("--score-unfinished", default="open", choices=["open", "closed"],
                    help="how our reward model sees a cut-off answer; 'open' (tokens as generated) is what TRL "
                         "scores (the default here, for parity; our PPO's default is 'closed')")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every run (OMP_NUM_THREADS)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="set one of our PPO config keys in our runs (repeatable; for experiments)")
    a = ap.parse_args()

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds: comma-separated integers, got {a.seeds!r}")
    if not set(variants) <= {"full", "lora"}:
        ap.error(f"--variants: full and/or lora, got {a.variants!r}")
    sizes = ["tiny", "small"] if a.size == "both" else [a.size]
    bench = Path(a.bench_dir)
    for s in sizes:
        if not (bench / SIZES[s] / "prompts.jsonl").is_file():
            ap.error(f"{bench / SIZES[s]}: no prompts.jsonl (see ../shared/bench/README.md to build the models)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    trl_python = ensure_trl_venv(Path(a.trl_venv).expanduser())
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}

    report: dict[str, Any] = {"command": " ".join(sys.argv), "settings": vars(a), "cpus": os.cpu_count(),
                              "loadavg_before": os.getloadavg(), "cases": {}}
    md = [f"Command: `{report['command']}`; {a.episodes} episodes, batch {a.batch_size}, 1 minibatch, "
          f"{a.ppo_epochs} PPO epochs, response_length {a.response_length}, lr {a.lr}, kl_coef {a.kl_coef}, "
          f"temperature {a.temperature}, stop at eos, cut-off answers scored {a.score_unfinished}, fp32, "
          f"no gradient clipping (TRL 1.12 has none; ours unless --ours-set max_grad_norm=X), "
          f"seeds {a.seeds}, {a.threads} threads. "
          f"Median of {a.repeats * len(seeds)} run(s) by episodes/s.\n"]
    for size in sizes:
        for variant in variants:
            case = f"{size}, {variant}" + (f" (LoRA r={a.lora_r})" if variant == "lora" else "")
            model_dir = bench / SIZES[size]
            runs: dict[str, list[dict[str, Any]]] = {"TRL 1.12 gc-frozen": [], "ours": []}
            if a.trl_stock:
                runs["TRL 1.12 stock"] = []
            for seed, i in ((seed, i) for seed in seeds for i in range(1, a.repeats + 1)):
                tag = f"{size}-{variant}-seed{seed}-run{i}"
                lora = variant == "lora"
                print(f"== {case}, seed {seed}, run {i}/{a.repeats} (load {os.getloadavg()[0]:.2f})", flush=True)
                runs["TRL 1.12 gc-frozen"].append(run_trl(trl_python, model_dir, a, lora, True,
                                                          f"{tag}-trl-gcfreeze", out, env, seed))
                runs["ours"].append(run_ours(model_dir, a, lora, f"{tag}-ours", out, env, seed))
                if a.trl_stock:
                    runs["TRL 1.12 stock"].append(run_trl(trl_python, model_dir, a, lora, False,
                                                          f"{tag}-trl-stock", out, env, seed))
                for name, rs in runs.items():
                    r = rs[-1]
                    print(f"   {name}: {r['episodes_per_second']:.1f} episodes/s, {r['peak_rss_mb']:.0f} MB, "
                          f"score {r['score_start']:+.3f} -> {r['score_end']:+.3f}, KL {r['kl_end']:.2f}", flush=True)
            sides = {name: median_run(rs) for name, rs in runs.items()}
            report["cases"][case] = sides
            md.append(markdown(case, sides))
    report["loadavg_after"] = os.getloadavg()
    md.append(f"Load average (1/5/15 min) before {tuple(round(x, 2) for x in report['loadavg_before'])}, "
              f"after {tuple(round(x, 2) for x in report['loadavg_after'])}, on {os.cpu_count()} CPUs.\n")
    text = "\n".join(md)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
