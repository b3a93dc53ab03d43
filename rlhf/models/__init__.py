"""Models, shared by every stage and the exporter: Hub ids, local folders, LoRA adapter folders,
GGUF files and short names (`smollm2-135m`) resolved (`resolve`) and loaded (`load`), LoRA and 4-bit
QLoRA set-up, the token ids of chats (`tokens`), the ChatML template (`chatml`), the lean decoder
forward (`decoder`) and the offline tiny model (`tiny`)."""

from rlhf.models.load import (
    ModelOptions,
    add_lora,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    make_adapter_relocatable,
    stop_token_ids,
)
from rlhf.models.resolve import resolve_model

__all__ = ["ModelOptions", "add_lora", "load_causal_lm", "load_reward_model", "load_tokenizer", "load_value_model",
           "make_adapter_relocatable", "resolve_model", "stop_token_ids"]
