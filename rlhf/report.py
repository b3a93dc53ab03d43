"""report.md for a pipeline run folder: every number is read from the stages' metrics files.

Plots (PNG, matplotlib Agg) go to RUN/plots/: the reward model's held-out accuracy (overall and per
rejection strategy), PPO curves (score, KL, entropy, value loss over updates), agreement and JSON
validity per model on held-out chips. A stage without results is said to be missing, never guessed.

write_report reads the folder once (_Run) and joins one function per section, in the report's order;
_ladder is the choice those sections share: the stage's numbers, else disabled, else missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.io import atomic_write_text, read_json, read_jsonl
from rlhf.plots import save_figure
from rlhf.stages import PIPELINE


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _bars(groups: dict[str, dict[str, float]], path: Path, title: str, ylabel: str) -> Path:
    """Grouped bar chart: one group per key of `groups`, one bar per inner key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    series = list(dict.fromkeys(k for g in groups.values() for k in g))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(names) * max(1, len(series)) * 0.6 + 2), 3.4))
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        ys = [groups[n].get(s, 0.0) or 0.0 for n in names]
        bars = ax.bar(xs, ys, width, label=s)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20 if max(map(len, names)) > 10 else 0)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


@dataclass
class _Run:
    """A run folder as read once: each stage's metrics (None when missing) and pipeline.json."""

    root: Path
    m: dict[str, dict[str, Any] | None]
    pipe: dict[str, Any]

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def stages(self) -> dict[str, Any]:
        return self.pipe.get("stages", {})

    @property
    def models(self) -> dict[str, Any]:
        """The models the eval stage compared, by name ({} without eval results)."""
        return (self.m["eval"] or {}).get("models") or {}


def write_report(run_dir: str | Path) -> Path:
    root = Path(run_dir)
    run = _Run(root, {name: _load(root / stage.folder / "metrics.json") for name, stage in PIPELINE.items()},
               _load(root / "pipeline.json") or {})
    lines = _header(run)
    for section in (_stages, _data, _sft, _reward, _ppo, _evaluation, _samples, _export):
        lines += section(run)
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _ladder(run: _Run, name: str, body: Callable[[dict[str, Any]], list[str]],
            disabled: str | None = None) -> list[str]:
    """A stage's section: its body when its metrics.json exists, else the line saying it was disabled or is missing."""
    metrics = run.m[name]
    if metrics:
        return body(metrics)
    if disabled is not None and run.stages.get(name, {}).get("status") == "disabled":
        return [disabled]
    return [f"Missing: `{name}/metrics.json` not found."]


def _header(run: _Run) -> list[str]:
    lines = [f"# RLHF run: {run.pipe.get('name', run.root.name)}", ""]
    lines += [f"Run folder `{run.root}`, base model `{run.pipe.get('base_model', 'unknown')}`. Every number below is "
              "read from the stages' `metrics.json` files.", ""]
    return lines


def _stages(run: _Run) -> list[str]:
    lines = ["## Stages and wall time", "", "| stage | status | wall time (s) | folder |", "|---|---|---|---|"]
    missing: list[str] = []
    for name, stage in PIPELINE.items():
        st = run.stages.get(name, {})
        status = st.get("status") or ("done" if run.m[name] else "missing")
        if status == "disabled":
            pass
        elif not run.m[name]:
            status = "missing (no metrics.json)"
            missing.append(name)
        lines.append(f"| {name} | {status} | {_fmt(st.get('seconds'), 1)} | `{stage.folder}/` |")
    total = run.pipe.get("stage_seconds_total")
    lines += ["", f"Total stage time: {_fmt(total, 1)} s (the time of the runs that produced each stage's "
              "outputs; a skipped stage keeps the time it took when it ran)." if total is not None else
              "No pipeline.json: stage times unknown.", ""]
    if missing:
        lines += [f"**Missing stages:** {', '.join(missing)}: their sections below say so.", ""]
    return lines


def _data(run: _Run) -> list[str]:
    def body(d: dict[str, Any]) -> list[str]:
        keys = [k for k in ("teacher", "teacher_model", "rows", "skipped", "seconds") if k in d]
        return [f"- {k}: {_fmt(d[k]) if not isinstance(d[k], dict) else json.dumps(d[k])}" for k in keys] or \
               ["- see `data/metrics.json`"]

    return ["## Preference data", "", *_ladder(run, "data", body), ""]


def _sft(run: _Run) -> list[str]:
    def body(s: dict[str, Any]) -> list[str]:
        return [f"Train loss {_fmt(s.get('train_loss'))} over {_fmt(s.get('steps'))} steps; on held-out chips "
                f"greedy agreement {_fmt(s.get('agreement_greedy'))}, "
                f"JSON validity {_fmt(s.get('json_valid_greedy'))}."]

    return ["## SFT", "", *_ladder(run, "sft", body, "Disabled in the config: PPO started from the base model."), ""]


def _reward(run: _Run) -> list[str]:
    def body(r: dict[str, Any]) -> list[str]:
        by = r.get("accuracy_by_strategy") or {}
        groups = {"overall": {"accuracy": r.get("eval_accuracy") or 0.0}, **{k: {"accuracy": v} for k, v in by.items()}}
        png = _bars(groups, run.plots / "reward_accuracy.png", "reward model: held-out pair accuracy", "accuracy")
        lines = [f"Held-out pair accuracy {_fmt(r.get('eval_accuracy'))} on {_fmt(r.get('eval_pairs'))} pairs "
                 f"(mean margin {_fmt(r.get('eval_margin'))}).", "", "| rejection strategy | accuracy |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in by.items()]
        return [*lines, "", f"![reward accuracy]({_rel(png, run.root)})"]

    return ["## Reward model", "", *_ladder(run, "reward", body), ""]


def _ppo(run: _Run) -> list[str]:
    lines = ["## PPO", ""]
    log = run.root / "ppo" / "metrics.jsonl"
    rows = read_jsonl(log, tolerate_torn_tail=True) if log.is_file() else []
    # Not the ladder: PPO cannot be disabled, and its curves come from metrics.jsonl, which a killed run has too.
    lines += _ppo_summary(run.m["ppo"]) if run.m["ppo"] else ["Missing: `ppo/metrics.json` not found.", ""]
    if rows:
        from rlhf.plots import plot_curves
        from rlhf.ppo.metrics import CURVES

        png = plot_curves(rows, CURVES, run.plots / "ppo_curves.png",
                          title="PPO over updates")
        lines += [f"![PPO curves]({_rel(png, run.root)})", ""]
    elif run.m["ppo"]:
        lines += ["No `ppo/metrics.jsonl`: no curves.", ""]
    return lines


def _ppo_summary(p: dict[str, Any]) -> list[str]:
    lines = ["| | before | after |", "|---|---|---|",
             f"| greedy agreement | {_fmt(p.get('agreement_before'))} | {_fmt(p.get('agreement_after'))} |",
             f"| sampled agreement | {_fmt(p.get('agreement_sampled_before'))} | "
             f"{_fmt(p.get('agreement_sampled_after'))} |",
             f"| JSON validity | {_fmt(p.get('json_valid_before'))} | {_fmt(p.get('json_valid_after'))} |",
             f"| mean reward (sampled) | {_fmt(p.get('reward_before'))} | {_fmt(p.get('reward_after'))} |", "",
             f"{_fmt(p.get('updates'))} updates, {_fmt(p.get('episodes'))} episodes; "
             f"final KL {_fmt(p.get('kl_final'))}, "
             f"final score {_fmt(p.get('score_final'))}, {_fmt(p.get('episodes_per_second'), 1)} episodes/s.", ""]
    shares = p.get("action_share_after") or {}
    if shares:
        lines += ["Greedy answers after PPO: " + ", ".join(f"{a} {_fmt(v)}" for a, v in shares.items()) + ".", ""]
    if p.get("action_offsets"):
        lines += ["The reward's lead per action, taken out of each answer's score during PPO: "
                  + ", ".join(f"{a} {v:+.2f}" for a, v in p["action_offsets"].items()) + ".", ""]
    if p.get("collapse_warning"):
        w = p["collapse_warning"]
        lines += [f"**Warning: collapse.** From update {w['update']}, {w['share']:.0%} of a batch answered "
                  f"`{w['action']}` while batch agreement stayed at {w['agreement_batch']:.2f} "
                  f"(start {w['agreement_start']:.2f}).", ""]
    if p.get("judge_calls"):
        lines += [f"Ollama judge: {p['judge_failures']} of {p['judge_calls']} judgements failed "
                  "(each scored a neutral 0.5).", ""]
    return lines


def _evaluation(run: _Run) -> list[str]:
    lines = ["## Held-out evaluation", ""]
    models = run.models
    if models:
        lines += _eval_table(run, models)
    elif run.m["ppo"]:
        p = run.m["ppo"]
        groups = {"before PPO": {"agreement": p.get("agreement_before"), "JSON valid": p.get("json_valid_before")},
                  "after PPO": {"agreement": p.get("agreement_after"), "JSON valid": p.get("json_valid_after")}}
        png = _bars(groups, run.plots / "agreement.png", "held-out chips (PPO's own evaluation)", "share")
        lines += ["Missing: `eval/metrics.json` not found; the chart shows PPO's own before/after evaluation.", "",
                  f"![agreement]({_rel(png, run.root)})", ""]
    else:
        lines += ["Missing: neither `eval/metrics.json` nor `ppo/metrics.json` found.", ""]
    return lines


def _eval_table(run: _Run, models: dict[str, Any]) -> list[str]:
    from rlhf.evaluate import COLUMNS

    ev = run.m["eval"] or {}
    rewards = ev.get("rewards")
    reward = (f"reward: {' + '.join(f'{w:g} x {k}' for k, w in rewards.items())} on the sampled answers, as in PPO"
              if rewards else "reward: not measured")
    lines = [f"{_fmt(ev.get('n'))} held-out chips; sampled at T={_fmt(ev.get('temperature'), 2)}; "
             f"{reward}; KL to the reference (the PPO start) summed over answer tokens.", "",
             "| model | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {name} | " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |" for name, r in models.items()]
    groups = {name: {"agreement (greedy)": r.get("agreement_greedy"),
                     "agreement (sampled)": r.get("agreement_sampled"),
                     "JSON valid (greedy)": r.get("json_valid_greedy")} for name, r in models.items()}
    png = _bars(groups, run.plots / "agreement.png", "held-out chips: agreement with the rule teacher", "share")
    lines += ["", f"![agreement and JSON validity]({_rel(png, run.root)})", ""]
    return lines


def _samples(run: _Run) -> list[str]:
    lines = ["## Sample answers before and after PPO", ""]
    models = run.models
    before_name = next((k for k in ("sft", "base") if k in models), None)
    pairs: list[tuple[str, str, str]] = []
    if before_name and "ppo" in models:
        for b, a in zip(models[before_name].get("samples", []), models["ppo"].get("samples", [])):
            pairs.append((b["prompt"], b["response"], a["response"]))
        label = f"before = `{before_name}`, after = `ppo`, greedy, from eval"
    elif run.m["ppo"]:
        for b, a in zip(run.m["ppo"].get("samples_before", []), run.m["ppo"].get("samples_after", [])):
            pairs.append((b["prompt"], b["response"], a["response"]))
        label = "greedy, from PPO's own evaluation"
    if pairs:
        lines += [f"({label})", ""]
        for prompt, b, a in pairs:
            lines += [f"**Prompt:** {prompt}", "", f"- before: `{b}`", f"- after: `{a}`", ""]
    else:
        lines += ["Missing: no sample answers recorded.", ""]
    return lines


def _gguf_check_line(check: dict[str, Any] | None) -> str:
    if not check:
        return "Not checked in llama.cpp (install llama-cpp-python, the dev extra, to check the GGUF's answers)."
    return (f"llama.cpp vs transformers, greedy, on {check['prompts']} held-out prompts: prompt tokens identical "
            f"{check['tokenization_identical']:.0%}, answers identical {check['answers_identical']:.0%}, "
            f"same action {check['actions_identical']:.0%}.")


def _export(run: _Run) -> list[str]:
    def body(e: dict[str, Any]) -> list[str]:
        return [f"GGUF `{e.get('gguf')}` ({_fmt(e.get('outtype'))}, {_fmt(e.get('gguf_bytes'))} bytes), "
                f"Modelfile `{e.get('modelfile')}`; pushed to Ollama: {_fmt(e.get('pushed'))}.", "",
                f"Bring it into Ollama: `ollama create {e.get('name')} -f {e.get('modelfile')}` then "
                f"`ollama run {e.get('name')}`.", "", _gguf_check_line(e.get("gguf_check"))]

    return ["## Export", "", *_ladder(run, "export", body, "Disabled in the config."), ""]
