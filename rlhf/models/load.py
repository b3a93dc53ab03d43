"""Loading every model: one loader for policy, reference, reward/value models and export.

A name goes through `rlhf.models.resolve` first (folders, LoRA adapter folders, GGUF files, short
names, Hub ids); an adapter is loaded on its base. A damaged file (JSON, safetensors) is named in
one line with the fix. Also fresh LoRA adapters for training (4-bit QLoRA prepared).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.config import field
from rlhf.errors import UserError
from rlhf.io import atomic_write_json
from rlhf.models.chatml import IM_END
from rlhf.models.precision import DTYPE_HELP, resolve_dtype
from rlhf.models.resolve import resolve_model


@dataclass
class ModelOptions:
    """How to load a trainable model. Stage configs inherit these keys (SFT, reward, PPO)."""

    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        "float32", help=DTYPE_HELP)
    load_in_4bit: bool = field(False, help="QLoRA: nf4 weights via bitsandbytes (works on CPU too, slowly)")
    trust_remote_code: bool = field(False, help="allow model code from the model folder (off: safer)")
    use_lora: bool = field(True, help="train LoRA adapters instead of all weights")
    lora_r: int = field(16, help="LoRA rank", min=1)
    lora_alpha: int = field(32, help="LoRA alpha", min=1)
    lora_dropout: float = field(0.0, help="LoRA dropout", min=0, lt=1)
    lora_target_modules: str = field("all-linear", help="'all-linear' or comma-separated module names")
    lora_layers: int = field(0, min=0, help="adapters on the last N transformer layers only (0: all). The backward "
                                     "pass then stops at the lowest adapted layer: on CPU, 8 of SmolLM2's 30 "
                                     "layers halve a training step")


def _adapter_base(adapter_dir: Path) -> str:
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{adapter_dir}/adapter_config.json: not valid JSON; restore it, or rerun the stage that "
                        "wrote this adapter") from None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json has no base_model_name_or_path; "
                        "set it to the folder of the base model")
    # a relative base is relative to the adapter (as we write it), never first to the current directory:
    # "../sft" from another working directory could name an unrelated model
    candidates = [base] if Path(base).is_absolute() else [str(adapter_dir / base), str(adapter_dir.parent / base), base]
    for candidate in candidates:
        if Path(candidate).is_dir():
            return resolve_model(candidate)
    try:
        return resolve_model(base)
    except UserError:
        raise UserError(f"{adapter_dir}: the LoRA's base model {base!r} cannot be found; restore it or edit "
                        "base_model_name_or_path in adapter_config.json") from None


def _torch_dtype(name: str) -> Any:
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[resolve_dtype(name)]
    except KeyError:
        raise UserError(f"dtype must be float32, bfloat16, float16 or auto; got {name!r}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _damaged_json(folder: str) -> str | None:
    """The first of a model folder's JSON files that does not parse (transformers' error may not name it)."""
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json", "adapter_config.json"):
        path = Path(folder, name)
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return str(path)
    return None


def _damaged_file(folder: str) -> str:
    """The first .safetensors file in `folder` that does not open (safetensors' error names none)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError):
            return str(path)
    return folder


@contextlib.contextmanager
def _readable_weights(folder: str) -> Iterator[None]:
    """A damaged weights file (random bytes, a truncated copy) is one line naming it and the fix."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise UserError(f"{_damaged_file(folder)}: not a readable safetensors file ({_first_line(e)}); "
                        "restore it, or rerun the stage that wrote this model") from None


def _from_pretrained(cls: Any, name: str, opts: ModelOptions, **kw: Any) -> Any:
    kwargs: dict[str, Any] = {"trust_remote_code": opts.trust_remote_code, "dtype": _torch_dtype(opts.dtype), **kw}
    if opts.load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if resolve_dtype(opts.dtype) == "bfloat16" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True)
    try:
        with _readable_weights(name):
            return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # ValueError: a config.json transformers cannot read
        broken = _damaged_json(name)
        if broken:
            raise UserError(f"{broken}: not valid JSON; restore it, or rerun the stage that wrote this model") from None
        raise UserError(f"cannot load model {name!r}: {_first_line(e)} (no Hub downloads here: "
                        "pass a local folder, a .gguf file or a short name)") from None


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str = "left") -> Any:
    """The tokenizer with pad and the turn-end token set right for ChatML models (Qwen2.5, SmolLM2)."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    if Path(path, "adapter_config.json").is_file() and not Path(path, "tokenizer_config.json").is_file():
        path = _adapter_base(Path(path))
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json raises plain Exception from `tokenizers`
        broken = _damaged_json(path)
        if broken:
            raise UserError(f"{broken}: not valid JSON; restore it, or rerun the stage that wrote this model") from None
        raise UserError(f"cannot load the tokenizer of {name_or_path!r} ({_first_line(e)}); restore its tokenizer "
                        "files (tokenizer.json, tokenizer_config.json) or rerun the stage that wrote it") from None
    if tok.pad_token is None:
        # Qwen2.5 pads with <|endoftext|>; never pad with the turn-end token, or masks eat the stop.
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.eos_token
    tok.padding_side = padding_side
    return tok


def stop_token_ids(tok: Any) -> list[int]:
    """Tokens that end an assistant turn. Qwen2.5 base says EOS=<|endoftext|>, instruct <|im_end|>:
    with ChatML both must stop generation."""
    ids = []
    vocab = tok.get_vocab()
    if IM_END in vocab:
        ids.append(vocab[IM_END])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def _base_and_adapter(name_or_path: str) -> tuple[str, str | None]:
    path = resolve_model(name_or_path)
    if Path(path, "adapter_config.json").is_file():
        return _adapter_base(Path(path)), path
    return path, None


def load_causal_lm(name_or_path: str, opts: ModelOptions | None = None, *, merge_lora: bool = False) -> Any:
    """A causal LM. A LoRA adapter folder is loaded on its base (merged when `merge_lora`)."""
    from transformers import AutoModelForCausalLM

    opts = opts or ModelOptions(use_lora=False)
    base, adapter = _base_and_adapter(name_or_path)
    if Path(base, "adapter_config.json").is_file():  # a LoRA trained on a LoRA (PPO after LoRA SFT)
        model = load_causal_lm(base, opts, merge_lora=True)
    else:
        model = _from_pretrained(AutoModelForCausalLM, base, opts)
    if adapter:
        from peft import PeftModel

        with _readable_weights(adapter):
            model = PeftModel.from_pretrained(model, adapter)
        if merge_lora:
            model = _merged(model, adapter)
    return model


def load_value_model(name_or_path: str, opts: ModelOptions | None = None, *, num_labels: int = 1,
                     pad_token_id: int | None = None, merge_lora: bool = True) -> Any:
    """A sequence-classification model (scalar head): the reward model, or the value model's start.

    From a causal LM the LM head is dropped and a new `score` head is created; from a trained
    reward model (possibly a LoRA adapter with its `score` head saved) the trained head is kept."""
    import warnings

    from transformers import AutoModelForSequenceClassification

    opts = opts or ModelOptions(use_lora=False)
    base, adapter = _base_and_adapter(name_or_path)
    if Path(base, "adapter_config.json").is_file():  # a LoRA trained on a LoRA (reward model on a LoRA SFT)
        model = load_value_model(base, opts, num_labels=num_labels)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _from_pretrained(AutoModelForSequenceClassification, base, opts, num_labels=num_labels)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if adapter:
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(adapter)
        if config.task_type != "SEQ_CLS":
            # an SFT (causal LM) adapter: its LoRA weights fit the backbone of the classifier too;
            # the untyped PeftModel loads them without the causal LM's generation hooks
            config.task_type = None
            with _readable_weights(adapter):
                model = _merged(PeftModel.from_pretrained(model, adapter, config=config), adapter)
        else:
            with _readable_weights(adapter):
                model = PeftModel.from_pretrained(model, adapter)
            if merge_lora:
                model = _merged(model, adapter)
    return model


# A scalar head's name in the transformers classes we load (Qwen2, Llama, GPT-2: score; BERT-likes: classifier)
HEAD_MODULES = ("score", "classifier")


def _not_a_reward_model(path: str) -> str | None:
    """What `path` (resolved) holds instead of a trained scalar head, or None when it holds one or
    cannot tell (a Hub id: no local files to read). AutoModelForSequenceClassification loads a causal LM
    too, with a freshly drawn head and only a warning, which would then score at random."""
    folder = Path(path)
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        try:
            cfg = json.loads(adapter.read_text(encoding="utf-8"))
        except ValueError:
            return None  # the loader names the damaged file
        saved = (cfg.get("modules_to_save") or []) if isinstance(cfg, dict) else []
        if isinstance(cfg, dict) and (cfg.get("task_type") == "SEQ_CLS" or any(m in HEAD_MODULES for m in saved)):
            return None
        task = cfg.get("task_type") if isinstance(cfg, dict) else None
        return f"a LoRA adapter of a causal LM (task_type {task}), without a trained score head"
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, AttributeError):
        return None
    if not archs or any(str(a).endswith("ForSequenceClassification") for a in archs):
        return None
    return f"a {archs[0]}, without a trained score head"


def load_reward_model(name_or_path: str, opts: ModelOptions | None = None, *, pad_token_id: int | None = None,
                      flag: str = "--reward_model") -> Any:
    """A trained reward model (scalar head), refused in one line when the folder holds a plain causal LM
    (the SFT model, say): scores from a random head would train or rank at random, silently."""
    path = resolve_model(name_or_path)
    problem = _not_a_reward_model(path)
    # a damaged weights file is the first thing to fix: the loader below names it (reading headers is cheap)
    if problem and _damaged_file(path) == path:
        raise UserError(f"{flag} {name_or_path}: not a reward model ({problem}); point {flag} at the reward "
                        "stage's output (the --output_dir of `rlhf reward`)")
    return load_value_model(name_or_path, opts, pad_token_id=pad_token_id)


def _merged(peft_model: Any, adapter: str) -> Any:
    """Merge the adapter, and name the result after the adapter folder: a LoRA trained on top of it
    then records that folder, not the bare base, as its base (else reloading it drops this one)."""
    model = peft_model.merge_and_unload()
    model.name_or_path = model.config.name_or_path = str(Path(adapter).resolve())  # peft reads the former
    return model


def make_adapter_relocatable(folder: str | Path) -> None:
    """Record an adapter's base relative to it when both live in one run folder (runs/x/ppo/policy ->
    ../../sft), so the run folder can be moved or copied whole; a base elsewhere stays absolute."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    base = cfg.get("base_model_name_or_path")
    if not base or not Path(base).is_absolute() or not Path(base).is_dir():
        return
    here, there = folder.resolve(), Path(base).resolve()
    common = Path(os.path.commonpath([here, there]))
    if len(here.relative_to(common).parts) <= 2:  # the adapter is at most two levels below the shared folder
        cfg["base_model_name_or_path"] = os.path.relpath(there, here)
        atomic_write_json(cfg_path, cfg)


def add_lora(model: Any, opts: ModelOptions, *, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap `model` with fresh LoRA adapters (and prepare 4-bit weights for training)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if opts.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets: Any = opts.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    layers = None
    if opts.lora_layers > 0:
        n_layers = model.config.num_hidden_layers
        if opts.lora_layers > n_layers:
            raise UserError(f"lora_layers is {opts.lora_layers} but the model has {n_layers} layers; "
                            f"use 1..{n_layers}, or 0 for all")
        layers = list(range(n_layers - opts.lora_layers, n_layers))
        if targets == "all-linear":  # peft takes layer indices only with module names: the layers' linears
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    config = LoraConfig(
        r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout, target_modules=targets,
        layers_to_transform=layers, task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    model = get_peft_model(model, config)
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()  # trained weights stay f32 (master weights); autocast computes in half
    return model


def check_train_layers(stage: str, train_layers: int, use_lora: bool) -> None:
    """train_layers is full fine-tuning of the top layers; with LoRA, lora_layers says where adapters go."""
    if train_layers and use_lora:
        raise UserError(f"{stage}: train_layers is for full fine-tuning; set use_lora false, or use lora_layers "
                        "for adapters on the last layers")


def train_last_layers(model: Any, n_layers: int) -> None:
    """Full fine-tuning of the last `n_layers` transformer layers and the final norm only: the rest
    (embeddings, so a tied LM head too) is frozen, and the backward pass stops at the lowest trained layer."""
    total = model.config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise UserError(f"train_layers is {n_layers} but the model has {total} layers; use 1..{total}, or 0 for all")
    trained = {f".layers.{i}." for i in range(total - n_layers, total)}
    for name, param in model.named_parameters():
        param.requires_grad_(any(t in f".{name}" for t in trained) or name.endswith("model.norm.weight"))
