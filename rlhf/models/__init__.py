"""Model loading, shared by every stage and the exporter: Hub ids, local folders, LoRA adapter
folders, GGUF files and short names (`smollm2-135m`), plus LoRA and 4-bit QLoRA set-up."""

from rlhf.models.load import (
    ModelOptions,
    add_lora,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    make_adapter_relocatable,
    resolve_model,
    stop_token_ids,
)

__all__ = ["ModelOptions", "add_lora", "load_causal_lm", "load_reward_model", "load_tokenizer", "load_value_model",
           "make_adapter_relocatable", "resolve_model", "stop_token_ids"]
