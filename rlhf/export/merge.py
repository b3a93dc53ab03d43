"""Load the model to export (LoRA merged into its base) and keep it as a plain HF folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.io import mark_owned, remove_owned_dir


def is_lora(name_or_path: str) -> bool:
    from rlhf.models import resolve_model

    return Path(resolve_model(name_or_path), "adapter_config.json").is_file()


def load_merged(name_or_path: str) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 with any LoRA adapter merged: the loader decides what M is."""
    from rlhf.models import ModelOptions, load_causal_lm, load_tokenizer

    model = load_causal_lm(name_or_path, ModelOptions(dtype="float32", use_lora=False), merge_lora=True)
    tok = load_tokenizer(name_or_path)
    return model.eval(), tok


def _ollama_friendly(folder: Path, tok: Any) -> None:
    """transformers 5 writes `rope_parameters` and chat_template.jinja; Ollama's safetensors importer
    reads a top-level `rope_theta` and tokenizer_config.json's `chat_template`. Write both."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    tc_path = folder / "tokenizer_config.json"
    if tc_path.is_file() and isinstance(getattr(tok, "chat_template", None), str):
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        if "chat_template" not in tc:
            tc["chat_template"] = tok.chat_template
            tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_hf(model: Any, tok: Any, hf_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write safetensors + config + tokenizer + chat template to `hf_dir`, replacing it whole: the
    folder is built under a temporary name and renamed, so a crash never leaves half of it. An
    existing `hf_dir` is replaced only when rlhf wrote it, or with `overwrite`."""
    hf_dir = Path(hf_dir)
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=hf_dir.parent, prefix=f".{hf_dir.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _ollama_friendly(tmp, tok)
        mark_owned(tmp)
        remove_owned_dir(hf_dir, force=overwrite)
        os.replace(tmp, hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"{hf_dir}: the tokenizer saved no tokenizer.json (a slow tokenizer?); export needs a "
                        "fast tokenizer")
    return hf_dir
