"""`rlhf eval`: compare any set of models on held-out chips (the test split).

Models are local (a folder, a LoRA adapter, a .gguf, a short name: `--models base=runs/base,ppo=runs/ppo/policy`)
or served by Ollama (`--ollama_models chip-advisor`, asked through the project's Ollama client).
For each model, on the first `n` prompts of the test split:
  agreement_greedy / json_valid_greedy  greedy answers (Ollama: temperature 0) judged by the rule teacher
  agreement_sampled / json_valid_sampled sampled at `temperature` (seeded)
  reward_mean       mean reward of the sampled answers under `rewards`, PPO's weighted sources built by
                    `rlhf.rewards.build_reward` (reward-model scores standardised as PPO does); the
                    pipeline passes PPO's own mix, so the column is the reward PPO optimised
  kl_to_reference   mean over prompts of sum over the sampled answer's tokens of
                    log p_model - log p_ref, both at `temperature` as in PPO (local models only)
  mean_length       tokens of the greedy answers
A table is printed and the same numbers are written to metrics.json as {"models": {name: {...}}}.
Local models are evaluated by `rlhf.generation.evaluate_model`, the evaluation `rlhf sft` and
`rlhf ppo` report too; answers are judged by `rlhf.generation.judge_answers` and scored by
`rlhf.rewards.build_reward`, as PPO scores them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhf.config import SEED, field
from rlhf.data.schema import PROMPT_COLUMNS, load_rows, resolve_split
from rlhf.errors import UserError
from rlhf.generation import Generated, evaluate_model, judge_answers
from rlhf.io import write_metrics
from rlhf.models import ModelOptions, load_causal_lm, load_tokenizer, stop_token_ids
from rlhf.models.precision import DTYPE_HELP
from rlhf.rewards import MixedReward, build_reward, check_reward_weights
from rlhf.training import quiet_transformers, seed_everything

Messages = list[dict[str, str]]


@dataclass
class EvalConfig:
    models: list[str] = field([], help="local models as name=PATH,name=PATH, or a YAML list of name=PATH "
                                       "(a bare PATH is named after its folder)")
    data: str = field("runs/data", help="folder from `rlhf data preference` (uses test.jsonl) or a .jsonl")
    output_dir: str = field("runs/eval", help="where metrics.json goes")
    seed: int = field(0, help="seed of the sampled answers (the same for every model)", **SEED)
    n: int = field(200, help="held-out prompts (the first n of the test split)", min=1)
    reward_model: str = field("", help="reward model of the 'model' reward source (empty: reward_mean is not "
                                       "measured when `rewards` uses it)")
    rewards: dict = field({"model": 1.0}, help="weighted reward sources of reward_mean, as PPO's `rewards`: "
                                              "model, rule, bonus, format, ollama ({}: not measured)")
    judge_model: str = field("qwen2.5:7b", help="Ollama judge of the 'ollama' reward source")
    reference: str = field("", help="reference model for kl_to_reference, usually the SFT model (empty: not measured)")
    ollama_models: list[str] = field([], help="models served by Ollama, comma-separated: name or label=ollama_name")
    ollama_host: str = field("", help="Ollama host(s), comma-separated (default $OLLAMA_HOST)")
    temperature: float = field(0.7, help="temperature of the sampled pass and of the KL log-probs (PPO's)", gt=0)
    max_new_tokens: int = field(48, help="answer length budget", min=1)
    draws: int = field(1, help="sampled answers per prompt in the sampled pass (its agreement, reward and KL "
                               "average them): 4 halves the sampling noise of 1", min=1)
    batch_size: int = field(64, help="prompts per generation batch", min=1)
    normalize_reward: bool = field(True, help="standardise reward-model scores by the reward stage's held-out stats")
    n_samples: int = field(3, help="greedy sample answers kept per model in metrics.json", min=0)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        "float32", help=DTYPE_HELP)
    concurrency: int = field(4, help="concurrent Ollama requests per host", min=1)
    timeout: float = field(120.0, help="seconds per Ollama request", gt=0)

    def validate(self) -> None:
        if not any(m.strip() for m in self.models) and not any(m.strip() for m in self.ollama_models):
            raise UserError("nothing to evaluate: pass --models name=PATH,... and/or --ollama_models NAME,...")
        if self.rewards:  # {}: reward_mean not measured
            check_reward_weights(self.rewards)

    def scorer(self) -> MixedReward | None:
        """reward_mean's reward, or None where it cannot be measured (no reward model for 'model')."""
        if not self.rewards or ("model" in self.rewards and not self.reward_model):
            return None
        return build_reward(self.rewards, reward_model=self.reward_model, ollama_model=self.judge_model,
                            ollama_host=self.ollama_host or None, dtype=self.dtype, normalize=self.normalize_reward)


def parse_named(items: list[str], what: str) -> dict[str, str]:
    """['a=X', 'b=Y'] or ['X', 'Y'] -> {name: value}; names must be unique."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in items):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq:
            name, value = Path(item.rstrip("/")).name or item, item
        name, value = name.strip(), value.strip()
        if not name or not value:
            raise UserError(f"--{what}: {item!r} is not name=VALUE")
        if name in out:
            raise UserError(f"--{what}: the name {name!r} is used twice; write name=VALUE to tell them apart")
        out[name] = value
    return out


@torch.no_grad()
def sequence_logprobs(model: Any, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                      mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over the masked response tokens of log p(token | prefix) at `temperature`: [B]."""
    from rlhf.models.decoder import causal_logits
    from rlhf.ppo.core import logprobs_of

    device = next(model.parameters()).device
    ids = torch.cat([query, response], 1).to(device)
    att = torch.cat([query_mask, torch.ones_like(response)], 1).to(device)
    n = response.shape[1]
    logits = causal_logits(model, ids, att, n + 1)[:, :-1]
    return (logprobs_of(logits, response.to(device), temperature) * mask.to(device)).sum(1).float().cpu()


def _same_vocab(a: Any, b: Any) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def eval_local(path: str, prompts: list[Messages], cfg: EvalConfig, scorer: MixedReward | None,
               reference: tuple[Any, Any] | None) -> dict[str, Any]:
    from rlhf.ppo.core import response_mask

    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, ModelOptions(dtype=cfg.dtype, use_lora=False), merge_lora=True).eval()
    stops = stop_token_ids(tok)
    kls: list[torch.Tensor] = []
    ref_model = reference[0] if reference is not None and _same_vocab(reference[1], tok) else None

    def kl_to_reference(g: Generated) -> None:  # each sampled batch, on its answers' tokens as generated
        mask, _ = response_mask(g.response, stops, tok.pad_token_id)
        lp = sequence_logprobs(model, g.query, g.query_mask, g.response, mask, cfg.temperature)
        ref_lp = sequence_logprobs(ref_model, g.query, g.query_mask, g.response, mask, cfg.temperature)
        kls.append(lp - ref_lp)

    # The sampled answers (judged, scored, compared with the reference) start from seed + 1 for every
    # model: differences are the models'.
    passes = evaluate_model(model, tok, prompts, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed + 1, batch_size=cfg.batch_size, n_samples=cfg.n_samples, score=scorer,
                            on_batch=kl_to_reference if ref_model is not None else None, draws=cfg.draws)
    greedy, sampled = passes["greedy"], passes["sampled"]
    return {
        "kind": "local", "path": path,
        "agreement_greedy": greedy["agreement"], "json_valid_greedy": greedy["json_valid"],
        "agreement_sampled": sampled["agreement"], "json_valid_sampled": sampled["json_valid"],
        "reward_mean": sampled.get("reward_mean"),
        "kl_to_reference": float(torch.cat(kls).mean()) if kls else None,
        "mean_length": greedy["mean_length"], "action_share": greedy["action_share"],
        "samples": greedy["samples"],
    }


def eval_ollama(name: str, prompts: list[Messages], cfg: EvalConfig, scorer: MixedReward | None,
                length_tok: Any) -> dict[str, Any]:
    """A model served by Ollama: greedy = temperature 0; sampled = `temperature` with a fixed seed
    per draw."""
    out: dict[str, Any] = {"kind": "ollama", "path": f"ollama:{name}"}
    answers: dict[str, list[str]] = {}
    judged: dict[str, dict[str, Any]] = {}
    finished = [True] * len(prompts)  # Ollama stops at the template's stop tokens: answers are complete as returned
    # the sampled pass: one request per prompt and draw, draw d at seed + d (one seed would repeat an answer)
    sampled = [{"temperature": cfg.temperature, "seed": cfg.seed + d} for d in range(cfg.draws)]
    for mode, draws in (("greedy", [{"temperature": 0, "seed": cfg.seed}]), ("sampled", sampled)):
        answers[mode] = [text for options in draws for text in _ollama_answers(name, prompts, cfg, options)]
        # the last pass's (the sampled one's) are what reward_mean scores
        asked, asked_finished = prompts * len(draws), finished * len(draws)
        judged[mode] = judge_answers(asked, answers[mode], asked_finished, length_tok=length_tok,
                                     n_samples=cfg.n_samples)
        out[f"agreement_{mode}"], out[f"json_valid_{mode}"] = judged[mode]["agreement"], judged[mode]["json_valid"]
    out["reward_mean"] = float(scorer(asked, answers["sampled"], asked_finished).mean()) if scorer else None
    out["kl_to_reference"] = None  # Ollama returns no token log-probabilities
    out["mean_length"] = judged["greedy"]["mean_length"]
    out["samples"] = judged["greedy"]["samples"]
    return out


def _ollama_answers(name: str, prompts: list[Messages], cfg: EvalConfig, options: dict[str, Any]) -> list[str]:
    """One answer per prompt from an Ollama model at these options, all requests at once."""
    from rlhf.ollama.pool import OllamaPool

    pool = OllamaPool(model=name, hosts=cfg.ollama_host or None, concurrency=cfg.concurrency,
                      timeout=cfg.timeout, options={**options, "num_predict": cfg.max_new_tokens})
    try:
        pool.check()
        with ThreadPoolExecutor(max_workers=pool.concurrency * len(pool.hosts)) as ex:
            results = list(ex.map(pool.chat_text, prompts))
    finally:
        pool.close()
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise UserError(f"Ollama model {name}: {len(failed)} of {len(results)} requests failed "
                        f"(first: {failed[0]}); check the server and rerun")
    return [r.text for r in results]


COLUMNS = [("agreement_greedy", "agree"), ("agreement_sampled", "agree@T"), ("json_valid_greedy", "json"),
           ("json_valid_sampled", "json@T"), ("reward_mean", "reward"), ("kl_to_reference", "KL(ref)"),
           ("mean_length", "length")]


def format_table(models: dict[str, dict[str, Any]]) -> str:
    width = max([5, *map(len, models)])
    head = "model".ljust(width) + "".join(f"{label:>10}" for _, label in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, m in models.items():
        cells = "".join(f"{m[k]:>10.3f}" if isinstance(m.get(k), (int, float)) else f"{'-':>10}" for k, _ in COLUMNS)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def run(cfg: EvalConfig) -> dict[str, Any]:
    quiet_transformers()
    seed_everything(cfg.seed)
    start = time.time()
    local = parse_named(cfg.models, "models")
    served = parse_named(cfg.ollama_models, "ollama_models")
    clash = set(local) & set(served)
    if clash:
        raise UserError(f"the name {sorted(clash)[0]!r} is given to a local and an Ollama model; rename one")
    rows = load_rows(resolve_split(cfg.data, "test"), PROMPT_COLUMNS)[: cfg.n]
    prompts = [r["prompt"] for r in rows]
    scorer = cfg.scorer()
    reference = None
    if cfg.reference:
        ref_model = load_causal_lm(cfg.reference, ModelOptions(dtype=cfg.dtype, use_lora=False), merge_lora=True)
        reference = (ref_model.eval(), load_tokenizer(cfg.reference))
    results: dict[str, dict[str, Any]] = {}
    for name, path in local.items():
        t = time.time()
        results[name] = eval_local(path, prompts, cfg, scorer, reference)
        if reference is not None and results[name]["kl_to_reference"] is None:
            results[name]["note"] = "no KL: the tokenizer differs from the reference's"
        results[name]["seconds"] = round(time.time() - t, 2)
        print(f"eval {name}: agreement {results[name]['agreement_greedy']:.3f} ({time.time() - t:.0f} s)", flush=True)
    length_tok = reference[1] if reference else (load_tokenizer(cfg.reward_model) if cfg.reward_model else None)
    for label, name in served.items():
        t = time.time()
        results[label] = eval_ollama(name, prompts, cfg, scorer, length_tok)
        results[label]["seconds"] = round(time.time() - t, 2)
    metrics = {"models": results, "n": len(prompts), "data": cfg.data, "reference": cfg.reference or None,
               "reward_model": cfg.reward_model or None, "rewards": cfg.rewards if scorer else None,
               "temperature": cfg.temperature,
               "wall_seconds": round(time.time() - start, 2)}
    print(f"\nheld-out chips: {len(prompts)} (agree@T, json@T: sampled at T={cfg.temperature})")
    print(format_table(results))
    write_metrics(cfg.output_dir, metrics)
    return metrics
