"""The last decoder layer computed only where its output is read.

PPO reads a model's outputs at the response positions only (the policy's logits, the value head)
or at the last position only (the reward model), yet a plain forward runs every layer at every
position. Earlier layers must run everywhere (the last layer's keys and values need them), but the
last layer's queries, attention output, MLP and final norm are only needed at the kept positions.
On the chip task's prompts (~40 tokens) with short answers that is most of the last layer's work,
in the forward and in the backward: a quarter of the model's matrix products on a 4-layer model.

The result is the same computation on fewer rows (equal to a full forward within float rounding,
tested). It applies to the Llama-style decoder layers checked here (Qwen2, Llama: pre-norm, rotary,
separate q/k/v projections, no sliding window); other models, and models under gradient
checkpointing (whose backward re-runs the layer after this context has ended), run the plain forward.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = {"Qwen2DecoderLayer", "LlamaDecoderLayer"}


def decoder_backbone(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, layers, final norm) inside a causal LM, a sequence
    classifier or a peft wrapper of either."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix, base)


def _last_layer(backbone: nn.Module) -> nn.Module | None:
    layers = getattr(backbone, "layers", None)
    config = getattr(backbone, "config", None)
    if layers is None or config is None or getattr(backbone, "gradient_checkpointing", False):
        return None
    if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None) and any(
            t == "sliding_attention" for t in getattr(config, "layer_types", None) or []):
        return None
    layer = layers[config.num_hidden_layers - 1]
    return layer if type(layer).__name__ in SUPPORTED_LAYERS else None


def supports_tail(model: nn.Module) -> bool:
    return _last_layer(decoder_backbone(model)) is not None


def _tail_forward(layer: nn.Module, keep: int, attention_mask: torch.Tensor) -> Any:
    """A forward for `layer` that returns only its last `keep` positions: keys and values from
    every position, everything else from the kept ones."""
    attn = layer.self_attn
    rotate_half = sys.modules[type(attn).__module__].rotate_half

    def forward(hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                **_: Any) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        x = layer.input_layernorm(hidden_states)
        q = attn.q_proj(x[:, -keep:]).view(batch, keep, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q = q * cos[:, :, -keep:] + rotate_half(q) * sin[:, :, -keep:]
        k = k * cos + rotate_half(k) * sin
        # causal over absolute positions, and no attention to padding
        query_pos = torch.arange(seq - keep, seq, device=x.device)
        allowed = torch.arange(seq, device=x.device)[None, :] <= query_pos[:, None]
        allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1])
        h = hidden_states[:, -keep:] + attn.o_proj(out.transpose(1, 2).reshape(batch, keep, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    return forward


@contextmanager
def tail_only(model: nn.Module, keep: int, attention_mask: torch.Tensor) -> Iterator[bool]:
    """Within this block, `model`'s forward returns hidden states (and logits) for the last `keep`
    positions only; yields whether it does (False: an unsupported model, which runs in full, so
    callers slice as before). `attention_mask`: the [B, T] mask of the inputs the block will pass."""
    layer = _last_layer(decoder_backbone(model))
    if layer is None or keep >= attention_mask.shape[1]:
        yield False
        return
    layer.forward = _tail_forward(layer, keep, attention_mask)
    try:
        yield True
    finally:
        del layer.forward  # back to the class's forward


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them, so log-probs match sampling."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def causal_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """A causal LM's logits at the last `keep` positions of left-padded inputs, its last layer run only there."""
    with tail_only(model, keep, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_of(attention_mask),
                     logits_to_keep=keep).logits[:, -keep:]


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's logits [B, labels] read at the last position of left-padded inputs,
    its last layer run only there."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with tail_only(model, 1, attention_mask):
        hidden = decoder_backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids_of(attention_mask)).last_hidden_state[:, -1]
    return base.score(hidden)
