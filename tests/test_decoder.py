"""The lean decoder forward (rlhf.models.decoder): equal to the model's own, doing less."""

from __future__ import annotations

import pytest
import torch

from rlhf.models.decoder import (
    causal_logits,
    frozen_depth,
    group_prompts,
    head_outputs,
    next_token_logits,
    position_ids_of,
    shared_depth,
    supports_lean,
    trunk_states,
)

SIZES = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64, "pad_token_id": 0}


def _model(arch: str, head: str) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, f"{arch}Config")(**SIZES, num_labels=1)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}For{head}")(config)
    with torch.no_grad():  # weights large enough that a wrong mask or rotation shows
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded rows of different lengths (pad 0, 3 and 6)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, SIZES["vocab_size"], (3, 12), generator=gen)
    att = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        ids[row, :pad], att[row, :pad] = 0, 0
    return ids, att


def _full_logits(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=att, position_ids=position_ids_of(att)).logits


@pytest.mark.parametrize("arch", ["Qwen2", "Llama"])
def test_causal_logits_equal_the_models_own_and_skip_the_prompt_in_the_last_layer(arch: str) -> None:
    model = _model(arch, "CausalLM")
    assert supports_lean(model)
    ids, att = _batch()
    rows_seen: list[int] = []
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[1]))
             for layer in model.model.layers]
    full = _full_logits(model, ids, att)[:, -4:]
    lean = causal_logits(model, ids, att, 4)
    for hook in hooks:
        hook.remove()
    assert rows_seen == [12, 12, 12, 4]  # the model's own forward: 12 positions in both layers; lean: 12, then 4
    assert lean.shape == full.shape
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=1e-5)


def test_gradients_equal_the_models_own() -> None:
    ids, att = _batch()
    weights = torch.randn(3, 4, SIZES["vocab_size"], generator=torch.Generator().manual_seed(2))
    grads = []
    for lean in (False, True):
        model = _model("Qwen2", "CausalLM").train()
        logits = causal_logits(model, ids, att, 4) if lean else _full_logits(model, ids, att)[:, -4:]
        (logits * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_head_outputs_equal_the_classifier_read_at_the_last_token() -> None:
    model = _model("Qwen2", "SequenceClassification")
    ids, att = _batch()
    # the classifier's own forward on the same rows right-padded: it reads the last non-pad token
    right_ids, right_att = torch.zeros_like(ids), torch.zeros_like(att)
    for row in range(3):
        n = int(att[row].sum())
        right_ids[row, :n], right_att[row, :n] = ids[row, -n:], 1
    expected = model(input_ids=right_ids, attention_mask=right_att).logits
    torch.testing.assert_close(head_outputs(model, ids, att, 1)[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_lora_model_and_its_disabled_adapter() -> None:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # non-zero adapters
    model = get_peft_model(_model("Qwen2", "CausalLM"), lora)
    ids, att = _batch()
    with_adapter = causal_logits(model, ids, att, 3)
    torch.testing.assert_close(with_adapter, _full_logits(model, ids, att)[:, -3:], atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        without = causal_logits(model, ids, att, 3)
        torch.testing.assert_close(without, _full_logits(model, ids, att)[:, -3:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_adapter, without, atol=1e-3)


def test_the_frozen_trunk_then_the_adapted_layers_equal_the_whole_forward() -> None:
    """LoRA on the top layer only: the bottom layer's output, computed once, feeds the policy (logits
    and gradients as the whole forward's), its reference (adapters off) and the value head."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], init_lora_weights=False, layers_to_transform=[1])
    ids, att = _batch()
    weights = torch.randn(3, 4, SIZES["vocab_size"], generator=torch.Generator().manual_seed(2))
    logits, grads = [], []
    for use_trunk in (False, True):
        model = get_peft_model(_model("Qwen2", "CausalLM"), lora).train()
        assert frozen_depth(model) == 1
        trunk = trunk_states(model, ids, att, 1) if use_trunk else None
        out = causal_logits(model, ids, att, 4, trunk=trunk)
        (out * weights).sum().backward()
        logits.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        with model.disable_adapter():
            logits.append(causal_logits(model, ids, att, 4, trunk=trunk).detach())
    torch.testing.assert_close(logits[2], logits[0], atol=1e-5, rtol=1e-5)  # the policy
    torch.testing.assert_close(logits[3], logits[1], atol=1e-5, rtol=1e-5)  # its reference
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    assert grads[0] and set(grads[0]) == set(grads[1])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)
    classifier = get_peft_model(_model("Qwen2", "SequenceClassification"), lora)
    torch.testing.assert_close(head_outputs(classifier, ids, att, 4, trunk=trunk_states(classifier, ids, att, 1)),
                               head_outputs(classifier, ids, att, 4), atol=1e-5, rtol=1e-5)


def _grouped_batch(n_resp: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts (left padding 0 and 3) x 3 sampled responses each (one ends in padding)."""
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randint(1, SIZES["vocab_size"], (2, 7), generator=gen)
    prompt_att = torch.ones_like(prompts)
    prompts[1, :3], prompt_att[1, :3] = 0, 0
    responses = torch.randint(1, SIZES["vocab_size"], (6, n_resp), generator=gen)
    responses[4, -2:] = 0  # after its stop token: padding, attended as the rows' layout attends it
    ids = torch.cat([prompts.repeat_interleave(3, 0), responses], 1)
    att = torch.cat([prompt_att.repeat_interleave(3, 0), torch.ones_like(responses)], 1)
    return ids, att


@pytest.mark.parametrize("arch", ["Qwen2", "Llama"])
def test_rows_sharing_a_prompt_run_it_once_with_the_rows_logits_values_and_gradients(arch: str) -> None:
    """The shared-prompt layout: each prompt's layers run once for its 3 responses, and the logits,
    gradients, the trunk's continuation and the value head equal those of running every row."""
    from peft import LoraConfig, get_peft_model

    ids, att = _grouped_batch()
    groups = group_prompts(ids, att, 4, 3)
    assert groups.ids.shape == (2, 7 + 3 * 4)
    weights = torch.randn(6, 4, SIZES["vocab_size"], generator=torch.Generator().manual_seed(2))
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], init_lora_weights=False, layers_to_transform=[1])
    logits, grads = [], []
    for shared in (None, groups):
        model = get_peft_model(_model(arch, "CausalLM"), lora).train()
        positions_seen: list[int] = []
        model.base_model.model.model.layers[0].mlp.register_forward_hook(
            lambda m, i, o, seen=positions_seen: seen.append(i[0].shape[0] * i[0].shape[1]))
        out = causal_logits(model, ids, att, 5, groups=shared)[:, :-1]
        (out * weights).sum().backward()
        logits.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        trunk = trunk_states(model, ids, att, 1, groups=shared)
        torch.testing.assert_close(causal_logits(model, ids, att, 5, trunk=trunk, groups=shared)[:, :-1].detach(),
                                   logits[-1], atol=1e-5, rtol=1e-5)
        assert positions_seen[0] == (6 * 11 if shared is None else 2 * 19)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)
    classifier = _model(arch, "SequenceClassification")
    torch.testing.assert_close(head_outputs(classifier, ids, att, 5, groups=groups),
                               head_outputs(classifier, ids, att, 5), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="runs of 3"):
        group_prompts(ids[[0, 1, 3, 2, 4, 5]], att, 4, 3)


def test_frozen_depth_counts_the_layers_below_any_training() -> None:
    from peft import LoraConfig, get_peft_model

    assert frozen_depth(_model("Qwen2", "CausalLM")) == 0  # every weight trains
    everywhere = get_peft_model(_model("Qwen2", "CausalLM"), LoraConfig(r=4, target_modules="all-linear"))
    assert frozen_depth(everywhere) == 0
    top = _model("Qwen2", "CausalLM").requires_grad_(False)
    top.model.layers[1].mlp.requires_grad_(True)  # full fine-tuning of the top layer's MLP
    assert frozen_depth(top) == 1


def test_shared_depth_finds_the_bottom_layers_two_models_hold_alike_and_a_trunk_continues() -> None:
    policy, value = _model("Qwen2", "CausalLM"), _model("Qwen2", "SequenceClassification")
    value.model.load_state_dict(policy.model.state_dict())  # a classifier on the policy's backbone
    assert shared_depth(policy, value, 2) == 2 and shared_depth(policy, value, 1) == 1
    with torch.no_grad():
        value.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert shared_depth(policy, value, 2) == 1
    ids, att = _batch()  # the policy's one-layer trunk, continued through the value model's own layer 1
    continued = trunk_states(value, ids, att, 2, start=trunk_states(policy, ids, att, 1))[1]
    torch.testing.assert_close(continued, trunk_states(value, ids, att, 2)[1])
    assert not torch.allclose(continued, trunk_states(policy, ids, att, 2)[1])
    with torch.no_grad():
        value.model.embed_tokens.weight[3, 0] += 1e-3
    assert shared_depth(policy, value, 2) == 0


@pytest.mark.parametrize("arch", ["Qwen2", "GPT2"])
def test_one_token_at_a_time_equals_the_whole_sequence(arch: str) -> None:
    """Keys and values carried from step to step (lean for Qwen2, the model's cache for GPT2)."""
    if arch == "GPT2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
        assert not supports_lean(model)
    else:
        model = _model(arch, "CausalLM")
    ids, att = _batch()
    with torch.no_grad():
        logits, past = next_token_logits(model, ids[:, :8], att[:, :8])
        steps = [logits]
        for t in range(8, 12):
            logits, past = next_token_logits(model, ids[:, t:t + 1], att[:, :t + 1], past)
            steps.append(logits)
        full = _full_logits(model, ids, att)[:, 7:]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_runs_the_models_own_forward() -> None:
    model = _model("Qwen2", "CausalLM").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not supports_lean(model)
    ids, att = _batch()
    logits = causal_logits(model, ids, att, 4)
    logits.sum().backward()
    assert logits.shape == (3, 4, SIZES["vocab_size"])
