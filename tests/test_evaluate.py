"""`rlhf eval`: local models, an Ollama-served model (loopback), reward and KL, table and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ollama_server import Faults, LoopbackOllama, rule_source

from rlhf.chips import format_advice, rule_action, spec_from_prompt
from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.evaluate import EvalConfig, parse_named, run
from rlhf.io import read_jsonl

N = 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Held-out chips, two different tiny models and a (random-head) reward model folder."""
    from rlhf.data.preference import PreferenceConfig
    from rlhf.data.preference import run as make_data
    from rlhf.models import load_tokenizer, load_value_model
    from rlhf.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    make_data(PreferenceConfig(output_dir=str(root / "data"), n=40, test_fraction=0.5, sft_n=0))
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 1}
    a = build_tiny_model(root / "a", seed=0, **sizes)
    b = build_tiny_model(root / "b", seed=1, **sizes)
    c = root / "c"  # `a` with nudged weights: same tokenizer, so its KL to `a` is defined
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(c)
    tok = load_tokenizer(str(a))
    tok.save_pretrained(c)
    rm = load_value_model(str(a), pad_token_id=tok.pad_token_id)
    rm.save_pretrained(root / "rm")  # saved once: every load scores with the same head
    tok.save_pretrained(root / "rm")
    return {"data": str(root / "data"), "a": str(a), "b": str(b), "c": str(c), "rm": str(root / "rm")}


def _prompts(data: str) -> list[list[dict]]:
    return [r["prompt"] for r in read_jsonl(Path(data) / "test.jsonl")][:N]


def always(action: str):
    def source(messages, fmt, options):  # a model with one opinion, always well-formed
        return format_advice(action, "because")
    return source


def test_local_and_ollama_models_side_by_side(assets, tmp_path, capsys):
    sources = {"teacher": rule_source, "stubborn": always("increase"), "chatty": lambda m, f, o: "Nice chip!"}
    with LoopbackOllama(sources=sources) as server:
        models = f"a={assets['a']},b={assets['b']},c={assets['c']},a2={assets['a']}"
        rc = main(["eval", "--models", models, "--data", assets["data"],
                   "--n", str(N), "--reference", assets["a"], "--reward_model", assets["rm"],
                   "--ollama_models", "teacher,stubborn,chatty", "--ollama_host", server.url,
                   "--max_new_tokens", "16", "--output_dir", str(tmp_path)])
        chats = server.chat_requests()
    assert rc == 0
    models = json.loads((tmp_path / "metrics.json").read_text())["models"]
    assert list(models) == ["a", "b", "c", "a2", "teacher", "stubborn", "chatty"]
    prompts = _prompts(assets["data"])
    truth = [rule_action(spec_from_prompt(p[-1]["content"])) for p in prompts]

    # the Ollama-served models are judged by the rule teacher, like the local ones
    assert models["teacher"]["agreement_greedy"] == 1.0 and models["teacher"]["json_valid_greedy"] == 1.0
    assert models["teacher"]["agreement_sampled"] == 1.0
    assert models["stubborn"]["agreement_greedy"] == pytest.approx(truth.count("increase") / N)
    assert models["stubborn"]["json_valid_greedy"] == 1.0
    assert models["chatty"]["json_valid_greedy"] == 0.0 and models["chatty"]["agreement_greedy"] == 0.0
    assert models["teacher"]["kl_to_reference"] is None  # Ollama gives no log-probs
    assert models["teacher"]["mean_length"] > 5  # tokens of the reference's tokenizer
    # asked unconstrained (the format is what is measured): greedy at temperature 0, then sampled
    assert chats and all("format" not in c["body"] or not c["body"]["format"] for c in chats)
    temps = sorted({c["body"]["options"]["temperature"] for c in chats})
    assert temps == [0, 0.7]
    assert len(chats) == 3 * 2 * N

    # the reward model scores what the models answered: a well-formed right answer beats chatter
    assert models["teacher"]["reward_mean"] != models["chatty"]["reward_mean"]
    from rlhf.rewards import ModelReward

    direct = ModelReward(assets["rm"])(prompts, [rule_source(p, None, {}) for p in prompts], [True] * N)
    assert models["teacher"]["reward_mean"] == pytest.approx(float(direct.mean()), abs=1e-5)

    # KL to the reference: zero for the reference itself, positive for another model, and not
    # measured (said so) for a model whose tokenizer differs
    assert models["a"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert models["c"]["kl_to_reference"] > 0.1
    assert models["b"]["kl_to_reference"] is None and "tokenizer differs" in models["b"]["note"]
    # one seed for every model: the same weights under two names give the same numbers
    same = ("agreement_greedy", "agreement_sampled", "json_valid_greedy", "reward_mean", "mean_length")
    assert {k: models["a"][k] for k in same} == {k: models["a2"][k] for k in same}
    assert models["a"]["samples"] == models["a2"]["samples"]
    for m in models.values():
        assert 0 <= m["agreement_greedy"] <= m["json_valid_greedy"] <= 1

    out = capsys.readouterr().out
    table = out[out.index("model "):]
    assert all(name in table for name in models)
    assert "KL(ref)" in table


def test_deterministic_and_optional_measures(assets, tmp_path):
    cfg = EvalConfig(models=[f"b={assets['b']}"], data=assets["data"], n=6, max_new_tokens=12,
                     output_dir=str(tmp_path / "1"))
    first = run(cfg)["models"]["b"]
    again = run(EvalConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "2")}))["models"]["b"]
    first.pop("seconds"), again.pop("seconds")
    assert first == again
    assert first["reward_mean"] is None and first["kl_to_reference"] is None  # not asked for


def test_reward_mean_is_the_configured_mix_of_reward_sources(assets, tmp_path):
    cfg = EvalConfig(models=[f"b={assets['b']}"], data=assets["data"], n=6, max_new_tokens=12,
                     reward_model=assets["rm"], output_dir=str(tmp_path / "mix"))
    by_model = run(cfg)["models"]["b"]["reward_mean"]
    mixed = run(EvalConfig(**{**cfg.__dict__, "rewards": {"rule": 1.0, "model": 0.5},
                              "output_dir": str(tmp_path / "mix2")}))
    assert mixed["rewards"] == {"rule": 1.0, "model": 0.5}
    # the mix is rule + half the model's score, on the same sampled answers as the model-only run
    rule_only = run(EvalConfig(**{**cfg.__dict__, "rewards": {"rule": 1.0}, "output_dir": str(tmp_path / "r")}))
    assert mixed["models"]["b"]["reward_mean"] == pytest.approx(
        rule_only["models"]["b"]["reward_mean"] + 0.5 * by_model, abs=1e-5)
    # the rule needs no reward model; {} measures nothing
    no_rm = EvalConfig(**{**cfg.__dict__, "reward_model": "", "rewards": {"rule": 1.0},
                          "output_dir": str(tmp_path / "n")})
    assert run(no_rm)["models"]["b"]["reward_mean"] == rule_only["models"]["b"]["reward_mean"]
    none = run(EvalConfig(**{**cfg.__dict__, "rewards": {}, "output_dir": str(tmp_path / "e")}))
    assert none["models"]["b"]["reward_mean"] is None and none["rewards"] is None


def test_bad_inputs_are_one_line_errors(assets, tmp_path, capsys):
    assert main(["eval", "--data", assets["data"], "--output_dir", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--models", f"x={assets['a']},x={assets['b']}", "--data", assets["data"],
                 "--output_dir", str(tmp_path)]) == 2
    assert "used twice" in capsys.readouterr().err
    assert main(["eval", "--models", f"a={assets['a']}", "--data", assets["data"], "--rewards", "{rule: 1, vibes: 2}",
                 "--output_dir", str(tmp_path)]) == 2
    assert "unknown reward source 'vibes'" in capsys.readouterr().err
    with LoopbackOllama(faults=Faults(unknown_model={"ghost"})) as server:
        rc = main(["eval", "--ollama_models", "ghost", "--ollama_host", server.url, "--data", assets["data"],
                   "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "ollama pull ghost" in err[0]
    assert not (tmp_path / "metrics.json").exists()


def test_parse_named():
    assert parse_named(["a=x/y", " runs/ppo/policy", ""], "models") == {"a": "x/y", "policy": "runs/ppo/policy"}
    with pytest.raises(UserError, match="not name=VALUE"):
        parse_named(["a="], "models")


def test_models_are_a_list_from_yaml_or_comma_separated_on_the_command_line(tmp_path):
    """`--models a=X,b=Y` and a YAML list give the same list; the pipeline passes one as is."""
    from rlhf.config import build, parse

    want = ["a=x/y", "b=runs/ppo/policy"]
    assert parse(EvalConfig, ["--models", "a=x/y,b=runs/ppo/policy"], "eval").models == want
    assert build(EvalConfig, {"models": want}, "test").models == want
    assert build(EvalConfig, {"models": "a=x/y, b=runs/ppo/policy"}, "test").models == want
    assert parse(EvalConfig, ["--ollama_models", "m1,l=m2"], "eval").ollama_models == ["m1", "l=m2"]
    with pytest.raises(UserError, match="nothing to evaluate"):
        build(EvalConfig, {"models": [" "]}, "test")


def test_draws_judge_several_sampled_answers_per_prompt(assets, monkeypatch):
    """draws=2: the sampled pass asks each prompt twice in a row and averages over both answers;
    the greedy pass asks each once."""
    import rlhf.generation as generation

    prompts = _prompts(assets["data"])[:5]
    asked: list[tuple[bool, list]] = []

    def fake_generate(model, tok, batch, *, do_sample, **kw):  # every other answer is the teacher's
        asked.append((do_sample, list(batch)))
        start = sum(len(b) for s, b in asked[:-1] if s == do_sample)
        texts = [format_advice(rule_action(spec_from_prompt(p[-1]["content"])), "why") if (start + i) % 2 == 0
                 else "no idea" for i, p in enumerate(batch)]
        return generation.Generated(None, None, None, texts, [True] * len(batch))

    monkeypatch.setattr(generation, "generate", fake_generate)
    model = torch.nn.Linear(1, 1)
    out = generation.evaluate_model(model, None, prompts, max_new_tokens=8, seed=0, batch_size=4, draws=2)
    sampled = [p for s, b in asked if s for p in b]
    assert sampled == [p for p in prompts for _ in range(2)]
    assert [p for s, b in asked if not s for p in b] == prompts
    assert out["sampled"]["agreement"] == 0.5 and len(out["sampled"]["texts"]) == 10
    assert out["greedy"]["agreement"] == pytest.approx(3 / 5)  # answers 0, 2, 4 of five


def test_ollama_draws_ask_each_prompt_at_a_seed_per_draw(assets, tmp_path):
    def by_seed(messages, fmt, options):  # right at even seeds, chatter at odd ones
        spec = spec_from_prompt(messages[-1]["content"])
        return format_advice(rule_action(spec), "why") if options.get("seed", 0) % 2 == 0 else "Nice chip!"

    with LoopbackOllama(sources={"flip": by_seed}) as server:
        rc = main(["eval", "--ollama_models", "flip", "--ollama_host", server.url, "--data", assets["data"],
                   "--n", str(N), "--draws", "3", "--output_dir", str(tmp_path)])
        chats = server.chat_requests()
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())["models"]["flip"]
    assert m["agreement_greedy"] == 1.0
    assert m["agreement_sampled"] == pytest.approx(2 / 3)  # seeds 0, 1, 2
    assert len(chats) == N + 3 * N
