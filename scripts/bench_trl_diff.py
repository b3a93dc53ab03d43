#!/usr/bin/env python
"""Differential check of our PPO update against TRL 1.12's PPOTrainer on identical rollouts.

Usage:
    python scripts/bench_trl_diff.py [--model-dir ../shared/bench/tiny_qwen] [--batches sampled,edge]
        [--parallel-value false,true] [--ours-set KEY=VALUE ...] [--json-out diff.json]

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_trl_diff.py                          # the check
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_trl_diff.py --ours-set max_grad_norm=0  # no clipping

Exit code 0 when every gated quantity agrees within its tolerance after the known layout differences
are mapped, 1 otherwise (2: the run itself failed).

Same policy, reference, value and reward weights (the bench folder), the same prompts and the same sampled
response tokens on both sides, the bench's settings (batch 8, 1 minibatch, 4 PPO epochs, response_length
24, lr 3e-4 with the linear schedule over 512 episodes, kl_coef 0.05, temperature 0.7, fp32):

- TRL: `scripts/bench_trl112_diff_side.py`, in the TRL 1.12 venv (the one `bench_ppo_vs_trl.py` uses, made
  on first use), runs TRL's real `PPOTrainer.train()` for one update: TRL samples the responses (or, for the
  `edge` batch, some rows are replaced by given tokens), and every tensor of that update is read off it. It
  also replays the PPO epochs in a transcription (checked to reproduce the real weights) with the rollout in
  our layout ("TRL mapped"): the score on the stop token, not one after it; values zero after the stop; the
  value loss up to the stop; and, where our side clips gradients, the same per-model clipping.
- Ours: `rlhf.ppo.trainer.PPOTrainer`, built from the config `bench_ppo_vs_trl.py::run_ours` writes (the
  reward model behind `reward_as_trained`'s template), `rollout()` then `learn()`. Only the sampler is
  replaced: `torch.multinomial` inside `rlhf.generation.generate` returns TRL's tokens, so our own sampling
  loop, masks, decoding and scoring run as in training. What the trainer computes is read by wrapping
  `rlhf.ppo.core`'s functions, `rlhf.rewards.model.score_ids` and `PPOTrainer._optimizer_step` (observation only).
  With parallel_value true and one torch thread, the side thread is enabled and its two halves run one
  after the other (`--side-thread concurrent`: on a real second thread).

Compared per batch and variant: prompt and response tokens, masks, reward-model inputs, scores, log-probs,
reference log-probs, KL, non-score and total rewards (where the score lands), values, advantages, returns,
the first minibatch step's forwards and losses (pg, vf), the gradients per tensor before clipping, the
gradient norms and losses of all 4 steps, the weights after the update, the lr and the optimizer settings.
Rows marked "vs TRL" compare against TRL's real tensors and may differ by a known, explained amount (then
the verdict says which difference, and the row does not gate); rows marked "vs mapped" gate the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
from bench_ppo_vs_trl import DEFAULT_BENCH, DEFAULT_VENV, ensure_trl_venv, reward_as_trained  # noqa: E402
from bench_settings import add_bench_settings, bench_settings_argv  # noqa: E402

SIDE = SCRIPTS / "bench_trl112_diff_side.py"

# The `edge` batch: rows of the sampled batch replaced (by prompt index) with canonical token sequences
# (decode -> encode gives them back, so text-based scoring sees the same tokens): a shorter answer, a stop in
# the middle, and a response that never stops (24 tokens, scored open). The script checks them against the
# tokenizer.
EDGE_TEXTS = {0: ("increase", True), 1: ("increase width, then decrease length", True),
              2: ("increase width, then decrease length and increase width again because power is high", False)}
# Demonstration batches (not in the default check; every row that differs is reported as the batch's known
# difference): the edge batch plus one row of single tokens (by piece) that the two sides read differently.
SPECIAL_ROWS = {
    "pad": ({3: ["decrease", "<|endoftext|>", " length", "<|im_end|>"]},
            "TRL reads a sampled pad token (<|endoftext|>) as the end of the response; we keep it as a token"),
    "imstart": ({3: ["decrease", "<|im_start|>", " length", "<|im_end|>"]},
                "our reward model scores the decoded text (special tokens dropped), TRL the sampled ids"),
    "noncanonical": ({3: ["in", "crease", " width", "<|im_end|>"]},
                     "our reward model scores the re-tokenized text, TRL the sampled (non-canonical) ids"),
}
BATCHES = ("sampled", "edge", *SPECIAL_ROWS)

# Tolerances for fp32 noise between two implementations (HF's forward and KV-cached generate vs our lean
# forward), absolute except grad_rel / update_rel*: relative to TRL's gradient / weight change. Measured noise
# floors: <5e-6 per-token, <5e-5 gradients, <3e-4 the update over a model and <3e-3 for its worst tensor
# (tiny and small bench models). Clipping moves the update by 8-55%, vf_coef 0.1 -> 0.2 the value update by 2.5%.
TOL = {"tokens": 0.0, "logp": 2e-5, "value": 2e-5, "score": 2e-5, "adv": 1e-4, "loss": 2e-5, "grad_rel": 1e-4,
       "update_rel": 2e-3, "update_rel_tensor": 2e-2, "lr": 1e-12}


@dataclasses.dataclass
class Row:
    batch: str
    variant: str
    quantity: str
    diff: float
    rel: float
    tol: float
    verdict: str
    gate: bool
    ok: bool


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.batch = self.variant = ""
        self.batch_known: str | None = None  # demonstration batches: the reason any row of them differs

    def add(self, quantity: str, diff: float, rel: float, tol: float, known: str | None = None,
            gate: bool = True, rel_gate: bool = False) -> None:
        """One comparison. `known`: the explained reason a raw comparison may differ (the row does not gate).
        rel_gate: `tol` bounds the relative column instead of the absolute one."""
        value = rel if rel_gate else diff
        within = value <= tol and math.isfinite(value)
        if not within and self.batch_known:
            known = f"{known}; {self.batch_known}" if known else self.batch_known
        if within:
            verdict = "ok (float noise)" if value > 0 else "ok (equal)"
        elif known:
            verdict = f"KNOWN: {known}"
        else:
            verdict = "DIFF"
        gated = gate and not known
        self.rows.append(Row(self.batch, self.variant, quantity, diff, rel, tol, verdict, gated,
                             within or not gated))

    def info(self, quantity: str, diff: float, rel: float, verdict: str) -> None:
        self.rows.append(Row(self.batch, self.variant, quantity, diff, rel, float("nan"), verdict, False, True))

    def print(self, rows: list[Row]) -> None:
        width = max(len(r.quantity) for r in rows)
        print(f"| {'quantity':<{width}} | max abs diff | relative | tol | verdict |")
        print(f"|{'-' * (width + 2)}|---|---|---|---|")
        for r in rows:
            tol = "" if math.isnan(r.tol) else f"{r.tol:.0e}"
            print(f"| {r.quantity:<{width}} | {r.diff:.3e} | {r.rel:.3e} | {tol} | {r.verdict} |")


# ---- helpers on tensors ---------------------------------------------------------------------------------

def widen(x: torch.Tensor, width: int, fill: float = 0.0) -> torch.Tensor:
    """Right-pad [B, T] to [B, width] (our trainer trims response columns no row uses)."""
    if x.shape[1] >= width:
        return x[:, :width]
    pad = torch.full((x.shape[0], width - x.shape[1]), fill, dtype=x.dtype)
    return torch.cat([x, pad], 1)


def masked_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(max abs diff, that / max abs of b), over `mask`."""
    a, b = a.double(), b.double()
    if mask is not None:
        m = mask.bool()
        a, b = a[m], b[m]
    if a.numel() == 0:
        return 0.0, 0.0
    d = float((a - b).abs().max())
    scale = float(b.abs().max())
    return d, d / scale if scale > 0 else (0.0 if d == 0 else math.inf)


def tensor_dict_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                     base: dict[str, torch.Tensor] | None = None) -> tuple[float, float, list[tuple], float]:
    """(max abs diff, max over tensors of ||a - b|| / ||b - base||, per-tensor rows, the same ratio over all
    tensors together). With `base`, the relative columns compare the two changes from it (an update)."""
    if set(a) != set(b):
        raise SystemExit(f"parameter names differ: {sorted(set(a) ^ set(b))[:4]}")
    worst_abs = worst_rel = 0.0
    sq_diff = sq_ref = 0.0
    per: list[tuple] = []
    for k in a:
        x, y = a[k].double(), b[k].double()
        ref = y - base[k].double() if base is not None else y
        d = x - y
        da, nref = float(d.abs().max()), float(ref.norm())
        rel = float(d.norm()) / nref if nref > 0 else (0.0 if da == 0 else math.inf)
        worst_abs, worst_rel = max(worst_abs, da), max(worst_rel, rel)
        sq_diff, sq_ref = sq_diff + float(d.norm()) ** 2, sq_ref + nref**2
        per.append((k, float((x - base[k].double()).norm() if base is not None else x.norm()), nref, da, rel))
    total = math.sqrt(sq_diff / sq_ref) if sq_ref > 0 else (0.0 if sq_diff == 0 else math.inf)
    return worst_abs, worst_rel, per, total


def model_norm(grads: dict[str, torch.Tensor], prefix: str) -> float:
    return math.sqrt(sum(float(g.double().norm()) ** 2 for k, g in grads.items() if k.startswith(prefix)))


# ---- TRL side -------------------------------------------------------------------------------------------

def run_trl(python: Path, a: argparse.Namespace, batch: str, clip_norms: list[float], work: Path) -> dict[str, Any]:
    out = work / f"trl-{batch}.pt"
    cmd = [str(python), str(SIDE), "--model-dir", str(a.model_dir), *bench_settings_argv(a),
           "--prompt-offset", str(a.prompt_offset), "--seed", str(a.seed),
           "--clip-norms", ",".join(repr(c) for c in clip_norms), "--out", str(out)]
    if batch != "sampled":
        forced = edge_tokens(a.model_dir, batch)
        path = work / f"forced-{batch}.json"
        path.write_text(json.dumps(forced))
        cmd += ["--force-responses", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    log = work / f"trl-{batch}.log"
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if rc:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"the TRL side failed (exit {rc}); log: {log}")
    return torch.load(out, weights_only=False)


def edge_tokens(model_dir: Path, batch: str) -> dict[int, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir / "policy")
    forced: dict[int, list[int]] = {}
    for k, (text, stop) in EDGE_TEXTS.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok(tok.decode(ids), add_special_tokens=False)["input_ids"] != ids:
            raise SystemExit(f"edge row {k}: {text!r} is not a canonical tokenization for this tokenizer")
        forced[k] = ids + [tok.eos_token_id] if stop else ids
    for k, pieces in SPECIAL_ROWS.get(batch, ({}, ""))[0].items():
        ids = []
        for piece in pieces:
            one = [tok.convert_tokens_to_ids(piece)] if piece.startswith("<|") else \
                tok(piece, add_special_tokens=False)["input_ids"]
            if len(one) != 1:
                raise SystemExit(f"{batch} row {k}: {piece!r} is not one token for this tokenizer")
            ids += one
        forced[k] = ids
    return forced


# ---- our side -------------------------------------------------------------------------------------------

class ForcedTorch:
    """`torch` as rlhf.generation sees it, except that multinomial returns the next column of `tokens`
    (and keeps the sampler's log-probability of it)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self._tokens, self._step = tokens, 0
        self.logprobs: list[torch.Tensor] = []

    def multinomial(self, probs: torch.Tensor, num_samples: int) -> torch.Tensor:
        if self._step >= self._tokens.shape[1]:
            raise RuntimeError("our sampler asked for more tokens than TRL generated")
        col = self._tokens[:, self._step].to(probs.device)
        self._step += 1
        self.logprobs.append(probs.gather(1, col[:, None]).squeeze(1).double().log().float())
        return col[:, None]

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def recorder(fn: Callable[..., Any], calls: list[tuple[tuple, dict, Any]]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out
    return wrapped


def detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(detached(v) for v in x)
    if isinstance(x, dict):
        return {k: detached(v) for k, v in x.items()}
    return x


def run_ours(trl: dict[str, Any], a: argparse.Namespace, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    import yaml

    import rlhf.ppo.core as core
    import rlhf.ppo.trainer as trainer_mod
    import rlhf.rewards.model as scoring
    from rlhf.config import build
    from rlhf.models.tokens import chat_ids
    from rlhf.ppo.config import PPOConfig
    from rlhf.training import quiet_transformers

    quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix="ours-", dir=work))
    rows = trl["prompt_rows"]
    prompts = [rows[i] for i in trl["prompt_index"]]  # TRL's batch order
    data = tmp / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    reward = reward_as_trained(a.model_dir / "reward", tmp / "reward")
    cfg_values: dict[str, Any] = {  # as scripts/bench_ppo_vs_trl.py::run_ours writes it
        "model": str(a.model_dir / "policy"), "reward_model": str(reward),
        "value_model": str(a.model_dir / "reward"), "data": str(data), "output_dir": str(tmp / "run"),
        "total_episodes": a.episodes, "batch_size": a.batch_size, "num_ppo_epochs": a.ppo_epochs,
        "num_mini_batches": 1, "response_length": a.response_length, "learning_rate": a.lr,
        "kl_coef": a.kl_coef, "temperature": a.temperature, "stop_token": "eos", "dtype": "float32",
        "use_lora": False, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "rewards": {"model": 1.0},
        "normalize_reward": False, "missing_eos_penalty": 0.0, "eval_prompts": 0, "save_every": 0,
        "sample_every": 0, "report_to": "none", "resume": False, "lr_schedule": "linear", "seed": a.seed,
        "value_head_init": "reward", "score_unfinished": "open",
    }
    cfg_values.update(overrides)
    cfg = build(PPOConfig, yaml.safe_load(yaml.safe_dump(cfg_values)), "bench_trl_diff")

    if cfg.parallel_value and torch.get_num_threads() < 2:
        # the trainer turns its side thread on from 2 torch threads (then gives each thread 1): make it see 2
        with patched(torch, "get_num_threads", lambda: 2):
            tr = trainer_mod.PPOTrainer(cfg)
        torch.set_num_threads(1)
        if tr.runner.parallel and a.side_thread == "sequential":  # its two halves one after the other
            tr.runner.run = lambda side, main: (side(), main())  # type: ignore[method-assign]
    else:
        tr = trainer_mod.PPOTrainer(cfg)
    inner = tr.inner
    named = ([(f"policy.{n}", p) for n, p in inner.policy.named_parameters()]
             + [(f"value.{n}", p) for n, p in inner.value.named_parameters()])
    init = {n: p.detach().clone() for n, p in named}

    calls: dict[str, list[tuple[tuple, dict, Any]]] = {k: [] for k in (
        "kl_per_token", "per_token_rewards", "gae", "masked_whiten", "policy_loss", "value_loss", "score_ids")}
    steps: list[dict[str, Any]] = []
    original_step = tr._optimizer_step

    def optimizer_step(which: int, step: bool = True) -> torch.Tensor:
        params = (tr._policy_params, tr._value_params)[which]
        prefix = ("policy.", "value.")[which]
        ids = {id(p) for p in params}
        grads = {n: p.grad.detach().clone() for n, p in named if id(p) in ids and n.startswith(prefix)
                 and p.grad is not None}
        lr = tr.optimizers[which].param_groups[0]["lr"]
        norm = original_step(which, step)
        steps.append({"which": which, "grads": grads, "norm": float(norm), "lr": lr})
        return norm

    tr._optimizer_step = optimizer_step  # type: ignore[method-assign]
    forced = ForcedTorch(trl["rollout"]["responses"])
    import rlhf.generation as generation_mod

    patches = [patched(core, name, recorder(getattr(core, name), calls[name])) for name in
               ("kl_per_token", "per_token_rewards", "gae", "masked_whiten", "policy_loss", "value_loss")]
    patches.append(patched(scoring, "score_ids", recorder(scoring.score_ids, calls["score_ids"])))
    for p in patches:
        p.__enter__()
    try:
        with patched(generation_mod, "torch", forced):
            batch = tr.rollout(prompts)
        rollout = {k: detached(v) for k, v in vars(batch).items() if k != "graphs"}
        lr_before = tr.schedulers[0].get_last_lr()[0]
        stats = tr.learn(batch, 0)
        lr_after = [s.get_last_lr()[0] for s in tr.schedulers]
    finally:
        for p in reversed(patches):
            p.__exit__(None, None, None)
        if tr.runner.parallel:
            tr.runner.close()
            torch.set_num_threads(1)
        import gc

        gc.unfreeze()
    weights = {n: p.detach().clone() for n, p in named}
    seqs = calls["score_ids"][0][0][2] if calls["score_ids"] else []
    (logp_arg, ref_arg, *_), _, _ = calls["kl_per_token"][0]
    (scores_arg, kl_masked, mask_arg, kl_coef), _, rewards = calls["per_token_rewards"][0]
    policy_losses = [detached(c[2]) for c in calls["policy_loss"]]
    value_losses = [detached(c[2]) for c in calls["value_loss"]]
    opt = tr.optimizers[0].optimizer if hasattr(tr.optimizers[0], "optimizer") else tr.optimizers[0]
    result = {
        "cfg": cfg, "side": tr.runner.parallel, "split_prompt": tr.collect.split_prompt,
        "reuse": tr.collect.reuse_forward, "rollout": rollout, "stats": stats, "init": init, "weights": weights,
        "ref_logp": ref_arg.detach().clone(), "logp_kl": logp_arg.detach().clone(),
        "kl": kl_masked.detach().clone(), "rewards": rewards.detach().clone(), "kl_coef": kl_coef,
        "gae": detached(calls["gae"][0][2]), "policy_losses": policy_losses, "value_losses": value_losses,
        "steps": steps, "lr_before": lr_before, "lr_after": lr_after, "reward_inputs": seqs,
        "sampler_logp": torch.stack(forced.logprobs, 1) if forced.logprobs else None,
        "optimizer": {k: v for k, v in opt.param_groups[0].items() if k != "params"},
        "prompt_ids": [chat_ids(tr.tok, p, add_generation_prompt=True) for p in prompts],
    }
    return result


# ---- the comparison -------------------------------------------------------------------------------------

KNOWN_P1 = "TRL scores one after the stop and bootstraps the stop token from V there"


def compare(t: Table, trl: dict[str, Any], ours: dict[str, Any], clip: str) -> list[tuple]:
    """Rows of `t` for one batch and variant; returns the per-tensor gradient rows of the first step."""
    r, mr = trl["rollout"], trl["mapped_rollout"]
    W = r["responses"].shape[1]
    o = ours["rollout"]
    mask_o = widen(o["mask"], W).bool()
    mask_t = ~r["padding_mask"]
    has_p1 = bool((~r["padding_mask_p1"] & r["padding_mask"]).any())  # a column after the stop inside the width
    pad = trl["pad_token_id"]

    # tokens
    q_ok = all([x for x in qo if x != pad] == [x for x in qt if x != pad]
               for qo, qt in zip(ours["prompt_ids"], r["queries"].tolist()))
    t.add("prompt tokens (vs TRL)", 0.0 if q_ok else 1.0, 0.0, TOL["tokens"])
    resp_o = widen(o["response"], W, pad)
    d = float((resp_o != r["responses"])[mask_t].any())
    t.add("response tokens up to the stop (vs TRL)", d, 0.0, TOL["tokens"])
    t.add("response mask / stop position (vs TRL)", float((mask_o != mask_t).sum()), 0.0, TOL["tokens"])
    t.add("has stop (vs TRL)", float((o["has_stop"] != r["contain_eos_token"]).sum()), 0.0, TOL["tokens"])
    trl_inputs = []
    for q, resp in zip(r["queries"].tolist(), r["postprocessed_responses"].tolist()):
        trl_inputs.append([x for x in q if x != pad] + [x for x in resp if x != pad])
    n_diff = sum(a != b for a, b in zip(ours["reward_inputs"], trl_inputs))
    t.add(f"reward-model input tokens, rows differing of {len(trl_inputs)} (vs TRL)", float(n_diff), 0.0,
          TOL["tokens"])

    # rollout numbers
    t.add("score (vs TRL)", *masked_diff(o["scores"], r["scores"]), TOL["score"])
    if masked_diff(o["scores"], r["scores"])[0] > TOL["score"]:
        def fmt(x: torch.Tensor) -> str:
            return " ".join(f"{v:+.3f}" for v in x.tolist())
        t.info(f"  scores by row: ours {fmt(o['scores'])}; TRL {fmt(r['scores'])}", 0.0, 0.0, "info")
        t.info(f"  response lengths: ours {o['mask'].sum(1).tolist()}; TRL {(mask_t.sum(1)).tolist()}",
               0.0, 0.0, "info")
    t.add("log-probs, rollout (vs TRL's generation logits)", *masked_diff(widen(o["logp"], W), r["logprobs"], mask_t),
          TOL["logp"])
    if ours["sampler_logp"] is not None:
        t.info("  our sampler's log-prob of the token (vs TRL's generation)",
               *masked_diff(widen(ours["sampler_logp"], W), r["logprobs"], mask_t),
               "info: our KV-cached sampling loop")
    t.add("reference log-probs (vs TRL)", *masked_diff(widen(ours["ref_logp"], W), r["ref_logprobs"], mask_t),
          TOL["logp"])
    t.add("KL per token (vs TRL)", *masked_diff(widen(ours["kl"], W), r["kl"], mask_t), TOL["logp"])
    nsr_o = widen(-ours["kl_coef"] * ours["kl"], W)
    t.add("non-score reward per token (vs TRL)", *masked_diff(nsr_o, r["non_score_reward"], mask_t), TOL["logp"])
    rows = torch.arange(W)
    end_o = torch.where(mask_o, rows, -1).max(1).values  # our score: on the last valid token
    end_t = torch.where(r["sequence_lengths"] + 1 < W, r["sequence_lengths"] + 1, r["sequence_lengths"])
    t.add("where the score lands, rows differing (vs TRL)", float((end_o != end_t).sum()), 0.0, TOL["tokens"],
          known="ours on the stop token, TRL one after it" if has_p1 else None)
    mask_any = mask_t | ~r["padding_mask_p1"]
    t.add("total reward per token (vs TRL)", *masked_diff(widen(ours["rewards"], W), r["rewards"], mask_any),
          TOL["logp"], known=KNOWN_P1 if has_p1 else None)
    t.add("total reward per token (vs mapped)", *masked_diff(widen(ours["rewards"], W), mr["rewards"], mask_any),
          TOL["logp"])
    t.add("values up to the stop (vs TRL)", *masked_diff(widen(o["values"], W), r["values"], mask_t), TOL["value"])
    t.add("advantages (vs TRL)", *masked_diff(widen(o["advantages"], W), r["advantages"], mask_any), TOL["adv"],
          known=KNOWN_P1 if has_p1 else None)
    t.add("advantages (vs mapped)", *masked_diff(widen(o["advantages"], W), mr["advantages"], mask_any), TOL["adv"])
    t.add("returns (vs TRL)", *masked_diff(widen(o["returns"], W), r["returns"], mask_any), TOL["adv"],
          known=KNOWN_P1 if has_p1 else None)
    t.add("returns (vs mapped)", *masked_diff(widen(o["returns"], W), mr["returns"], mask_any), TOL["adv"])
    ent_t = float((trl["real"]["entropy"] * mask_t).sum() / mask_t.sum())
    t.add("entropy at the temperature, token mean (vs TRL's 1st step)", abs(float(o["entropy"]) - ent_t),
          abs(float(o["entropy"]) - ent_t) / abs(ent_t), TOL["logp"])

    # first minibatch step
    first_logp = ours["rollout"]["logp"] if ours["reuse"] else None
    if first_logp is not None:
        t.add("1st step new log-probs (ours: the rollout's) (vs TRL forward)",
              *masked_diff(widen(first_logp, W), trl["real"]["new_logprobs"], mask_t), TOL["logp"])
        t.add("1st step values (ours: the rollout's) (vs TRL forward)",
              *masked_diff(widen(o["values"], W), trl["real"]["vpred"], mask_t), TOL["value"])
    m_none = trl["mapped"]["none"]
    m_ref = trl["mapped"][clip]
    pg_o, vf_o = [float(x[0]) for x in ours["policy_losses"]], [float(x[0]) for x in ours["value_losses"]]
    pg_t, vf_t = trl["real"]["pg_losses"], trl["real"]["vf_losses"]
    pg_m, vf_m = [s["pg_loss"] for s in m_ref["steps"]], [s["vf_loss"] for s in m_ref["steps"]]
    t.add("pg loss, 1st step (vs TRL)", abs(pg_o[0] - pg_t[0]), abs(pg_o[0] - pg_t[0]) / max(abs(pg_t[0]), 1e-30),
          TOL["loss"], known=KNOWN_P1 if has_p1 else None)
    t.add("pg loss, 1st step (vs mapped)", abs(pg_o[0] - pg_m[0]), abs(pg_o[0] - pg_m[0]) / max(abs(pg_m[0]), 1e-30),
          TOL["loss"])
    t.add("vf loss, 1st step (vs TRL)", abs(vf_o[0] - vf_t[0]), abs(vf_o[0] - vf_t[0]) / abs(vf_t[0]), TOL["loss"],
          known=(KNOWN_P1 + "; TRL's value loss also covers that token") if has_p1 else None)
    t.add("vf loss, 1st step (vs mapped)", abs(vf_o[0] - vf_m[0]), abs(vf_o[0] - vf_m[0]) / abs(vf_m[0]), TOL["loss"])

    g_o = {}
    for s in ours["steps"][:2]:  # the first step's two optimizer calls (policy, value)
        g_o.update(s["grads"])
    g_t, g_m = trl["real"]["grads"], m_none["steps"][0]["grads"]
    for prefix in ("policy.", "value."):
        sub = {k: v for k, v in g_o.items() if k.startswith(prefix)}
        d_t = tensor_dict_diff(sub, {k: g_t[k] for k in sub})
        d_m = tensor_dict_diff(sub, {k: g_m[k] for k in sub})
        name = prefix[:-1]
        t.add(f"{name} gradients, 1st step, worst tensor (vs TRL)", d_t[0], d_t[1], TOL["grad_rel"], rel_gate=True,
              known=KNOWN_P1 if has_p1 else None)
        t.add(f"{name} gradients, 1st step, worst tensor (vs mapped)", d_m[0], d_m[1], TOL["grad_rel"],
              rel_gate=True)
        n_o, n_t = model_norm(sub, prefix), model_norm(g_m, prefix)
        t.info(f"  {name} gradient norm, 1st step: ours {n_o:.4g}, mapped TRL {n_t:.4g}", abs(n_o - n_t),
               abs(n_o - n_t) / n_t, "info")
        if prefix == "policy.":
            per_tensor = d_m[2]
        else:
            per_tensor = per_tensor + d_m[2]

    # all steps: losses and pre-clipping norms against the mapped replay with the same clipping
    if len(pg_o) == len(pg_m):
        d = max(max(abs(x - y) for x, y in zip(pg_o, pg_m)), max(abs(x - y) for x, y in zip(vf_o, vf_m)))
        t.add(f"pg and vf losses, all {len(pg_o)} steps (vs mapped{'' if clip == 'none' else ' + clip'})", d,
              d / max(max(map(abs, vf_m)), 1e-30), 10 * TOL["loss"])
    else:
        t.add("number of PPO steps (vs mapped)", abs(len(pg_o) - len(pg_m)), 1.0, 0.0)
    pol_norms = [s["norm"] for s in ours["steps"] if s["which"] == 0]
    val_norms = [s["norm"] for s in ours["steps"] if s["which"] == 1]
    if clip != "none":
        mn = [s["norms"] for s in m_ref["steps"]]
        d = max(max(abs(a - b["policy"]) / b["policy"] for a, b in zip(pol_norms, mn)),
                max(abs(a - b["value"]) / b["value"] for a, b in zip(val_norms, mn)))
        t.add("gradient norms before clipping, all steps (vs mapped + clip)", d, d, TOL["grad_rel"], rel_gate=True)
    t.info(f"  our policy grad norms {', '.join(f'{x:.3g}' for x in pol_norms)}; clipped at "
           f"{clip}", 0.0, 0.0, "info")

    # the update
    init_t, init_o = trl["init"], ours["init"]
    d_init = tensor_dict_diff(init_o, init_t)
    t.add("initial weights (vs TRL)", d_init[0], d_init[0], 0.0)
    w_o, w_t = ours["weights"], trl["real"]["weights"]
    d_tw = tensor_dict_diff(trl["transcribed"]["weights"], w_t, base=init_t)
    t.add("TRL transcription replays TRL's weights (TRL vs TRL)", d_tw[0], d_tw[3], TOL["update_rel"] / 100,
          rel_gate=True)
    for prefix in ("policy.", "value."):
        name = prefix[:-1]
        sub = {k: v for k, v in w_o.items() if k.startswith(prefix)}
        pick = {k: w_t[k] for k in sub}
        base = {k: init_t[k] for k in sub}
        d = tensor_dict_diff(sub, pick, base)
        size_o = math.sqrt(sum(x[1] ** 2 for x in d[2]))
        size_t = math.sqrt(sum(x[2] ** 2 for x in d[2]))
        size_m = math.sqrt(sum(float((m_none["weights"][k] - base[k]).double().norm()) ** 2 for k in sub))
        t.info(f"  {name} update size ||w_after - w_before||: ours {size_o:.4g}, TRL {size_t:.4g}, "
               f"mapped TRL {size_m:.4g} (ours / TRL {size_o / size_t:.3f})", abs(size_o - size_t),
               abs(size_o - size_t) / size_t, "info")
        reasons = [KNOWN_P1] if has_p1 else []
        norms = pol_norms if prefix == "policy." else val_norms
        clipped = clip != "none" and any(n > ours["cfg"].max_grad_norm for n in norms)
        if clipped:
            reasons.append(f"we clip gradients at {ours['cfg'].max_grad_norm:g} per model, TRL does not")
        # relative: ||change ours - change TRL|| / ||change TRL|| over the model's tensors together
        t.add(f"{name} weights after the update (vs TRL)", d[0], d[3], TOL["update_rel"],
              rel_gate=True, known="; ".join(reasons) or None)
        if clip != "none":
            d = tensor_dict_diff(sub, {k: m_none["weights"][k] for k in sub}, base)
            t.add(f"{name} weights after the update (vs mapped, no clipping)", d[0], d[3], TOL["update_rel"],
                  rel_gate=True, known=reasons[-1] if clipped else None)
        d = tensor_dict_diff(sub, {k: m_ref["weights"][k] for k in sub}, base)
        label = f"vs mapped{'' if clip == 'none' else ' + clip'}"
        t.add(f"{name} weights after the update ({label})", d[0], d[3], TOL["update_rel"], rel_gate=True)
        worst = max(d[2], key=lambda x: x[4])
        # one tensor whose gradient is near zero (e.g. a k_proj bias) turns float noise into a visible
        # difference through Adam's g / sqrt(v): a looser bound per tensor
        t.add(f"  worst tensor {worst[0]} ({label})", worst[3], worst[4], TOL["update_rel_tensor"], rel_gate=True)
    lr_t = trl["real"]["lrs"][0]
    t.add("lr of the update (vs TRL)", abs(ours["lr_before"] - lr_t), abs(ours["lr_before"] - lr_t) / lr_t, TOL["lr"])
    la = trl["real"]["lr_after"]
    t.add("lr after the schedule step (vs TRL)", max(abs(x - la) for x in ours["lr_after"]),
          max(abs(x - la) for x in ours["lr_after"]) / la, TOL["lr"])
    og, tg = ours["optimizer"], trl["optimizer"]["groups"][0]
    same = all(og[k] == tg[k] for k in ("betas", "eps", "weight_decay", "amsgrad", "maximize", "fused"))
    t.add("AdamW settings: betas, eps, weight decay, fused (vs TRL)", 0.0 if same else 1.0, 0.0, 0.0)
    return per_tensor


def parse_sets(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--ours-set wants KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(DEFAULT_BENCH / "tiny_qwen"),
                    help="bench model folder: policy/, reward/, prompts.jsonl")
    ap.add_argument("--trl-venv", default=str(DEFAULT_VENV), help="venv with trl==1.12.0 (created if missing)")
    ap.add_argument("--batches", default="sampled,edge",
                    help="comma-separated: sampled (TRL's own samples), edge (3 rows replaced: short, stop in the "
                         "middle, no stop); demonstrations, not gating: pad, imstart, noncanonical (edge + a row "
                         "with a sampled <|endoftext|>, a sampled <|im_start|>, a non-canonical tokenization)")
    ap.add_argument("--parallel-value", default="false,true", help="our parallel_value settings to run")
    ap.add_argument("--side-thread", choices=["sequential", "concurrent"], default="sequential",
                    help="parallel_value true on one torch thread: run the side thread's halves one after the "
                         "other (sequential) or use the trainer's real second thread (needs 2 torch threads)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="set one of our PPO config keys (repeatable), e.g. max_grad_norm=0 (no clipping, as TRL)")
    add_bench_settings(ap)
    ap.add_argument("--prompt-offset", type=int, default=0, help="the batch: prompts.jsonl rows offset..offset+8")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--per-tensor", action="store_true", help="print the per-tensor gradient table of every run")
    ap.add_argument("--json-out", default="", help="write every row here")
    a = ap.parse_args()
    a.model_dir = Path(a.model_dir)
    if a.side_thread == "sequential":
        torch.set_num_threads(1)
    overrides = parse_sets(a.ours_set)
    pv = [{"true": True, "false": False}[x.strip().lower()] for x in a.parallel_value.split(",") if x.strip()]
    max_norm = float(overrides.get("max_grad_norm", 1.0))
    clip = "none" if max_norm == 0 or max_norm >= 1e8 else repr(max_norm)
    batches = [b.strip() for b in a.batches.split(",") if b.strip()]
    if not set(batches) <= set(BATCHES):
        ap.error(f"--batches: any of {', '.join(BATCHES)}; got {a.batches!r}")

    python = ensure_trl_venv(Path(a.trl_venv).expanduser())
    table = Table()
    first_per_tensor: list[tuple] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-trl-diff-") as tmp:
        work = Path(tmp)
        for batch in batches:
            trl = run_trl(python, a, batch, [] if clip == "none" else [max_norm], work)
            widths = trl["rollout"]["sequence_lengths"] + 1
            scores = [round(x, 3) for x in trl["rollout"]["scores"].tolist()]
            print(f"== batch '{batch}': TRL's response lengths {widths.tolist()}, "
                  f"width {trl['rollout']['responses'].shape[1]}, scores {scores}", flush=True)
            for parallel in pv:
                variant = f"parallel_value={str(parallel).lower()}" + "".join(f", {s}" for s in a.ours_set)
                table.batch, table.variant = batch, variant
                table.batch_known = SPECIAL_ROWS[batch][1] if batch in SPECIAL_ROWS else None
                ours = run_ours(trl, a, {**overrides, "parallel_value": parallel}, work)
                if parallel and not ours["side"]:
                    print("   (parallel_value true, but the trainer chose no side thread)")
                per = compare(table, trl, ours, clip)
                if first_per_tensor is None or a.per_tensor:
                    first_per_tensor = per
                    print(f"\nPer-tensor gradients of the first step, batch '{batch}', {variant} "
                          "(ours before clipping vs TRL mapped):")
                    print("| tensor | ours norm | TRL norm | max abs diff | relative |\n|---|---|---|---|---|")
                    for name, n_o, n_t, da, rel in per:
                        print(f"| {name} | {n_o:.4e} | {n_t:.4e} | {da:.2e} | {rel:.2e} |")
                rows = [r for r in table.rows if r.batch == batch and r.variant == variant]
                print(f"\n### batch '{batch}', ours {variant} (side thread: {ours['side']}, "
                      f"prompt split: {ours['split_prompt']}, first step reuses the rollout: {ours['reuse']})\n")
                table.print(rows)
                print(flush=True)
    failed = [r for r in table.rows if not r.ok]
    if a.json_out:
        Path(a.json_out).write_text(json.dumps([dataclasses.asdict(r) for r in table.rows], indent=1))
    if failed:
        print(f"FAIL: {len(failed)} gated quantities differ beyond tolerance:")
        for r in failed:
            print(f"  [{r.batch}, {r.variant}] {r.quantity}: {r.diff:.3e} (relative {r.rel:.3e}, tol {r.tol:.0e})")
        return 1
    print(f"OK: every gated quantity agrees within tolerance ({sum(r.gate for r in table.rows)} gated rows, "
          f"{len(batches)} batches x {len(pv)} variants)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        sys.exit(2)
