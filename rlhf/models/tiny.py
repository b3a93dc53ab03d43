"""`rlhf tiny-model`: a tiny Qwen2-architecture model built offline and deterministically.

The tokenizer is a byte-level BPE trained with `tokenizers` on chip-advice text, with Qwen2's own
pre-tokenizer (transformers 5 loads a `qwen2` model's tokenizer as Qwen2Tokenizer, which splits
digits one by one: training with the same regex keeps ids identical after save and reload),
ChatML special tokens and chat template as Qwen2.5 uses (all from rlhf.models.chatml). The weights
are random (seeded): the SFT stage teaches the format. Loaded by the same code path as a real Qwen2.5.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.chips import ACTIONS, ChipSpec, dims_prompt, format_advice, rule_reason
from rlhf.config import SEED, field
from rlhf.errors import UserError
from rlhf.io import write_metrics
from rlhf.models.chatml import CHATML_JINJA, ENDOFTEXT, IM_END, IM_START, QWEN2_PRETOKENIZE_REGEX

MIN_VOCAB = 256 + 3  # the byte-level alphabet and the special tokens; BPE never goes below
FILLER = ["The weather is nice today.", "Bananas are yellow.", "I like trains.", "Paris is in France.",
          "json", "reason", "action", "the chip", "heat", "power", "mm", "increase decrease no_change"]


@dataclass
class TinyModelConfig:
    output_dir: str = field("runs/tiny-model", help="where the model folder is written")
    seed: int = field(0, help="seed of the tokenizer corpus and the weights", **SEED)
    vocab_size: int = field(512, help="BPE vocabulary size (incl. special tokens)", min=MIN_VOCAB,
                            why="the 256 byte tokens and 3 special tokens come first")
    hidden_size: int = field(128, help="model width", min=2)
    num_layers: int = field(2, help="transformer blocks", min=1)
    num_heads: int = field(4, help="attention heads", min=1)
    num_kv_heads: int = field(2, help="key/value heads (GQA as in Qwen2.5)", min=1)
    intermediate_size: int = field(512, help="MLP width", min=1)
    max_position_embeddings: int = field(512, help="context length", min=1)

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UserError(f"--num_heads {self.num_heads} does not divide --hidden_size {self.hidden_size}; "
                            "pick a divisor, e.g. --num_heads 4 with --hidden_size 128")
        if (self.hidden_size // self.num_heads) % 2:
            raise UserError(f"--hidden_size {self.hidden_size} / --num_heads {self.num_heads} is an odd head size "
                            f"({self.hidden_size // self.num_heads}); rotary embeddings need an even one")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"--num_kv_heads {self.num_kv_heads} does not divide --num_heads {self.num_heads} "
                            "(each key/value head serves a group of query heads); e.g. --num_kv_heads 1")


def chip_corpus(seed: int, n: int = 3000) -> list[str]:
    """Text the tokenizer is trained on: prompts (en, zh), answers, reasons, some filler."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        spec = ChipSpec(rng.randint(1, 100), rng.randint(1, 100), rng.randint(1, 100))
        lang = "en" if rng.random() < 0.8 else "zh"
        action = rng.choice(ACTIONS)
        out.append(f"{IM_START}user\n{dims_prompt(spec, lang)}{IM_END}\n{IM_START}assistant\n"
                   f"{format_advice(action, rule_reason(action, lang))}{IM_END}\n")
        out.append(rng.choice(FILLER))
    return out


def build_tokenizer(seed: int, vocab_size: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(chip_corpus(seed), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, bos_token=None,
                                 additional_special_tokens=[IM_START], padding_side="left", model_max_length=512)
    hf.chat_template = CHATML_JINJA
    return hf


def build_tiny_model(output_dir: str | Path, seed: int = 0, **sizes: Any) -> Path:
    """Write a tiny Qwen2 model + tokenizer to `output_dir` (deterministic for a seed)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = TinyModelConfig(output_dir=str(output_dir), seed=seed, **sizes)
    tok = build_tokenizer(cfg.seed, cfg.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(ENDOFTEXT))
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [config.eos_token_id]
    model.generation_config.pad_token_id = config.pad_token_id
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(cfg: TinyModelConfig) -> dict[str, Any]:
    start = time.time()
    sizes = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                          "intermediate_size", "max_position_embeddings")}
    out = build_tiny_model(cfg.output_dir, cfg.seed, **sizes)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    n_params = sum(p.numel() for p in _load(out).parameters())
    metrics = {"model_dir": str(out), "architecture": config.architectures[0], "parameters": n_params,
               "vocab_size": config.vocab_size, "seconds": round(time.time() - start, 2)}
    write_metrics(out, metrics)
    print(f"tiny Qwen2 model ({n_params:,} parameters) written to {out}")
    return metrics


def _load(path: Path) -> Any:
    from rlhf.models.load import load_causal_lm

    return load_causal_lm(str(path))
