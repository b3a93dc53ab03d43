"""A lean forward for Llama-style decoders (Qwen2, Llama), shared by PPO, scoring and sampling.

Two savings over calling the model:
- The last layer runs only where its output is read. PPO reads the policy's logits and the values at
  the response positions only, and the reward at the last position only. Earlier layers must run
  everywhere (the last layer's keys and values need them), but the last layer's queries, attention
  output and MLP are only needed at the kept positions. With the chip task's ~40-token prompts and
  short answers, that is most of the last layer, in the forward and the backward: a quarter of the
  matrix products of a 4-layer model.
- One mask and one rotary table per call, and no per-layer wrappers: about 0.6 ms less per forward of
  a 2-layer model, where such overhead is a third of the time.

The layers' own modules (norms, projections with any LoRA or 4-bit wrappers, MLP, rotary embedding)
do the work, so the result equals the model's own forward within float rounding (tested, logits
and gradients). Models of other architectures, with sliding-window attention or attention dropout,
and models under gradient checkpointing fall back to the model's own forward.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = {"Qwen2DecoderLayer", "LlamaDecoderLayer"}
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]
# (d, h): the hidden states [B, S, D] entering layer d, at every position of the inputs
Trunk = tuple[int, torch.Tensor]


def decoder_backbone(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, layers, final norm) inside a causal LM, a sequence
    classifier or a peft wrapper of either."""
    base = unwrap(model)
    return getattr(base, base.base_model_prefix, base)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_lean(model: nn.Module) -> bool:
    backbone = decoder_backbone(model)
    config, layers = getattr(backbone, "config", None), getattr(backbone, "layers", None)
    if config is None or layers is None or len(layers) != config.num_hidden_layers:
        return False
    if getattr(backbone, "gradient_checkpointing", False) or getattr(config, "attention_dropout", 0.0):
        return False
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None)
                                                                               or []):
        return False
    return all(type(layer).__name__ in SUPPORTED_LAYERS for layer in layers)


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them, so log-probs match sampling."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


@dataclass(frozen=True)
class PromptGroups:
    """Rows in runs of `size` that share one prompt, laid out as one sequence per run: the prompt
    once, then each row's response, each response attending to the prompt and to itself only, at
    the positions it has in its own row. The prompt is ~70% of a SmolLM2 chip row, so 4 samples of
    a prompt cost about half of 4 rows. Built by `group_prompts`; G = B / size sequences of L tokens."""

    size: int
    ids: torch.Tensor  # [G, L] long: prompt (left-padded) then `size` responses of T tokens
    positions: torch.Tensor  # [G, L] long: rotary positions, each response's as in its own row
    allowed: torch.Tensor  # [G, 1, L, L] bool: causal, no padding, no response sees another
    gather: torch.Tensor  # [size, T + 1] long: a row's outputs among the last 1 + size * T positions

    @property
    def n_keep(self) -> int:
        return 1 + self.size * (self.gather.shape[1] - 1)

    def take(self, groups: torch.Tensor) -> PromptGroups:
        """The sequences of these groups (a minibatch of whole groups)."""
        return PromptGroups(self.size, self.ids[groups], self.positions[groups], self.allowed[groups], self.gather)

    def rows(self, h: torch.Tensor) -> torch.Tensor:
        """[G, n_keep, ...] outputs at the kept positions -> [B, T + 1, ...] in the rows' layout, as
        a row-per-row forward keeping its last T + 1 positions gives them."""
        groups = torch.arange(h.shape[0], device=h.device).repeat_interleave(self.size)
        return h[groups[:, None], self.gather.repeat(h.shape[0], 1)]


def group_prompts(ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int, size: int) -> PromptGroups:
    """The shared-prompt layout of left-padded rows [B, P + T] whose runs of `size` rows have one
    prompt (their first P columns equal) and a response of T = n_response tokens each."""
    batch, seq = ids.shape
    n_prompt, n_groups = seq - n_response, batch // size
    if batch % size or not torch.equal(ids[:, :n_prompt].view(n_groups, size, -1).amin(1),
                                       ids[:, :n_prompt].view(n_groups, size, -1).amax(1)):
        raise ValueError(f"rows do not come in runs of {size} with one prompt")
    row_pos = position_ids_of(attention_mask).view(n_groups, size, seq)
    first = slice(None, None, size)
    packed = torch.cat([ids[first, :n_prompt], ids[:, n_prompt:].reshape(n_groups, -1)], 1)
    positions = torch.cat([row_pos[:, 0, :n_prompt], row_pos[:, :, n_prompt:].reshape(n_groups, -1)], 1)
    # segment 0: the prompt; segment j + 1: response j
    segment = torch.cat([torch.zeros(n_prompt, dtype=torch.long),
                         torch.arange(1, size + 1).repeat_interleave(n_response)]).to(ids.device)
    valid = torch.cat([attention_mask[first, :n_prompt].bool(),
                       attention_mask[:, n_prompt:].reshape(n_groups, -1).bool()], 1)
    index = torch.arange(packed.shape[1], device=ids.device)
    causal = index[None, :] <= index[:, None]
    same = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])
    allowed = (causal & same)[None] & valid[:, None, :]
    # kept outputs: the last prompt token (it predicts every response's first token), then the responses
    starts = 1 + torch.arange(size)[:, None] * n_response
    gather = torch.cat([torch.zeros(size, 1, dtype=torch.long), starts + torch.arange(n_response)], 1)
    return PromptGroups(size, packed, positions, allowed[:, None], gather.to(ids.device))


def decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                   past: KeyValues | None = None, return_key_values: bool = False,
                   trunk: Trunk | None = None, stop_layer: int | None = None, groups: PromptGroups | None = None
                   ) -> tuple[torch.Tensor, KeyValues | None]:
    """Final hidden states [B, keep, D] at the last `keep` positions of `input_ids` (left-padded),
    for a model where supports_lean() holds.

    past: keys and values per layer of earlier tokens (from return_key_values); `attention_mask`
    then covers the earlier tokens and the new ones, [B, P + T]. return_key_values: also the keys
    and values per layer over past and new tokens (for sampling one token at a time).
    trunk: (d, h), the hidden states [B, S, D] entering layer d at every position (from stop_layer=d):
    the layers below d are not run. stop_layer: return the hidden states entering that layer, at
    every position and before the final norm, instead of the final ones.
    groups: run rows that share a prompt in the shared-prompt layout (`input_ids` and `keep` are then
    the groups'; a trunk is in that layout too); the final hidden states come back per row, [B, T + 1, D]."""
    backbone = decoder_backbone(model)
    layers = backbone.layers
    if groups is not None:
        assert past is None and not return_key_values, "a shared-prompt layout runs whole sequences"
        input_ids, keep = groups.ids, groups.n_keep
    batch, seq = input_ids.shape
    n_past = past[0][0].shape[2] if past else 0
    keep = min(keep, seq)
    first, h = trunk if trunk is not None else (0, backbone.embed_tokens(input_ids))
    if groups is not None:
        positions, allowed = groups.positions, groups.allowed
    else:
        positions = position_ids_of(attention_mask)[:, n_past:]
        # causal over absolute positions, no attention to padding (a padding query, which sees nothing,
        # gets zeros from scaled_dot_product_attention, not NaN)
        key_pos = torch.arange(n_past + seq, device=h.device)
        allowed = (key_pos <= key_pos[n_past:, None]) & attention_mask[:, None, :].bool()
        allowed = allowed[:, None]  # [B, 1, T, P + T]
    cos, sin = backbone.rotary_emb(h, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotate_half = sys.modules[type(layers[0].self_attn).__module__].rotate_half
    key_values: KeyValues = []
    for i, layer in enumerate(layers):
        if i < first:
            continue
        if i == stop_layer:
            return h, None  # in the layout it ran in: a trunk
        attn = layer.self_attn
        n = keep if i == len(layers) - 1 else seq  # the last layer only where it is read
        x = layer.input_layernorm(h)
        q = attn.q_proj(x[:, -n:]).view(batch, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        q = q * cos[:, :, -n:] + rotate_half(q) * sin[:, :, -n:]
        k = k * cos + rotate_half(k) * sin
        if past:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        if return_key_values:
            key_values.append((k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, :, -n:], scale=attn.scaling,
                                             enable_gqa=q.shape[1] != k.shape[1])
        h = h[:, -n:] + attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = backbone.norm(h)
    return (h if groups is None else groups.rows(h)), key_values if return_key_values else None


def frozen_depth(model: nn.Module) -> int:
    """How many layers from the bottom nothing trains or adapts (no trainable weight, no LoRA
    adapter, embeddings frozen): their output is the same for the policy, its reference (adapters
    off) and every PPO epoch, so it can be computed once per batch (0: none, or not a lean model)."""
    if not supports_lean(model):
        return 0
    backbone = decoder_backbone(model)
    if any(p.requires_grad for p in backbone.embed_tokens.parameters()):
        return 0
    for i, layer in enumerate(backbone.layers):
        adapted = any("lora_" in name for name, _ in layer.named_modules())
        if adapted or any(p.requires_grad for p in layer.parameters()):
            return i
    return len(backbone.layers)


def shared_depth(a: nn.Module, b: nn.Module, limit: int) -> int:
    """How many bottom layers (the embeddings too) two lean models hold the same weights in, up to
    `limit`: their trunks up to there are one computation. A value model started from a reward model
    that trained LoRA on the SFT policy's top 16 of 30 layers shares its bottom 14 with the policy."""
    if not limit:
        return 0
    first, second = decoder_backbone(a), decoder_backbone(b)
    if not all(_same_weights(getattr(first, name), getattr(second, name)) for name in ("embed_tokens", "rotary_emb")):
        return 0
    for i in range(limit):
        if not _same_weights(first.layers[i], second.layers[i]):
            return i
    return limit


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    ours, theirs = dict(a.state_dict(keep_vars=True)), dict(b.state_dict(keep_vars=True))
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k])
        for k in ours)


def trunk_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: int,
                 groups: PromptGroups | None = None, start: Trunk | None = None) -> Trunk:
    """The trunk of left-padded inputs: the hidden states entering layer `depth` (see decoder_hidden);
    from `start`, a shallower trunk, only the layers between run."""
    seq = (input_ids if groups is None else groups.ids).shape[1]
    return depth, decoder_hidden(model, input_ids, attention_mask, seq, trunk=start, stop_layer=depth,
                                 groups=groups)[0]


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                 past: KeyValues | None = None, trunk: Trunk | None = None,
                 groups: PromptGroups | None = None) -> torch.Tensor:
    """A decoder's final hidden states [B, keep, D] (after the last norm) at the last `keep`
    positions of left-padded inputs: what an LM head or a scalar head reads. past, trunk, groups:
    as for decoder_hidden (lean models only)."""
    if past is not None or trunk is not None or groups is not None or supports_lean(model):
        return decoder_hidden(model, input_ids, attention_mask, keep, past=past, trunk=trunk, groups=groups)[0]
    return decoder_backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids_of(attention_mask)).last_hidden_state[:, -keep:]


def causal_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                  past: KeyValues | None = None, trunk: Trunk | None = None,
                  groups: PromptGroups | None = None) -> torch.Tensor:
    """A causal LM's logits [B, keep, V] at the last `keep` positions of left-padded inputs.
    past: the keys and values of the tokens before `input_ids`; trunk: the states of its frozen
    layers; groups: rows sharing prompts run once per prompt, keep = T + 1 (see decoder_hidden)."""
    if past is not None or trunk is not None or groups is not None or supports_lean(model):
        return unwrap(model).get_output_embeddings()(final_hidden(model, input_ids, attention_mask, keep, past,
                                                                  trunk, groups))
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_of(attention_mask),
                 logits_to_keep=keep).logits[:, -keep:]


def head_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                 past: KeyValues | None = None, trunk: Trunk | None = None,
                 groups: PromptGroups | None = None) -> torch.Tensor:
    """A sequence classifier's head (`score`) applied at each of the last `keep` positions of
    left-padded inputs: [B, keep, labels]. keep=1 is the classifier's own reading of a sequence.
    past, trunk, groups: as for causal_logits."""
    hidden = final_hidden(model, input_ids, attention_mask, keep, past, trunk, groups)
    head = unwrap(model).score
    # the head is trained in f32 over a bf16 backbone ("trained weights stay f32"); outside autocast
    # (the reward stage's held-out scoring) the hidden states must meet it in its dtype. Under LoRA,
    # peft's wrapper answers `weight` with the copy that runs (its trained one, or the original when
    # adapters are disabled)
    return head(hidden.to(head.weight.dtype))


def key_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> KeyValues:
    """Keys and values per layer of left-padded tokens, to continue from with `past` (lean models)."""
    kv = decoder_hidden(model, input_ids, attention_mask, 1, return_key_values=True)[1]
    assert kv is not None
    return kv


def next_token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      past: Any = None) -> tuple[torch.Tensor, Any]:
    """Logits [B, V] for the token after `input_ids` and the state to pass back for the next step
    (`past`: None for the prompt, then what the previous call returned; `attention_mask` covers the
    past and the new tokens)."""
    if supports_lean(model):
        hidden, key_values = decoder_hidden(model, input_ids, attention_mask, 1, past=past, return_key_values=True)
        return unwrap(model).get_output_embeddings()(hidden)[:, -1], key_values
    n_past = attention_mask.shape[1] - input_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_of(attention_mask)[:, n_past:], cache=past, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1], out.cache
