"""Hugging Face folder (safetensors + tokenizer.json) -> one GGUF file that llama.cpp and Ollama load.

Written from the format's facts (see shared/ollama-api.md), on the `gguf` package's writer and
quantizers. Supports the `qwen2` (Qwen2/Qwen2.5) and `llama` (Llama, SmolLM2) architectures with a
byte-level BPE tokenizer. Every key llama.cpp would otherwise silently default is set explicitly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhf.errors import UserError
from rlhf.models.chatml import CHATML_JINJA, ENDOFTEXT, QWEN2_PRETOKENIZE_REGEX

OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")

# HF class name -> GGUF architecture
ARCHITECTURES: dict[str, str] = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}

# Llama 3's pre-tokenizer regex as tokenizer.json writes it (Qwen2's is QWEN2_PRETOKENIZE_REGEX, shared with
# the tiny model's tokenizer); pre_tokenizer_name gives each its llama.cpp name.
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


@dataclass
class ConvertResult:
    path: Path
    architecture: str
    n_tensors: int
    n_vocab: int  # entries in the GGUF token list (= embedding rows)
    n_tokenizer: int  # tokens the tokenizer defines; the rest are unused padding
    pre_tokenizer: str
    bytes: int


def gguf_architecture(config: dict[str, Any], where: str = "config.json") -> str:
    """The GGUF architecture for a HF config, or a UserError naming what cannot be converted."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    name = archs[0] if archs else f"model_type={config.get('model_type')!r}"
    raise UserError(f"{where}: architecture {name} cannot be exported to GGUF; supported: "
                    f"{', '.join(ARCHITECTURES)} (Qwen2/Qwen2.5, Llama, SmolLM2)")


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """rope_theta and scaling, from `rope_parameters` (transformers 5's config.json) or the top-level
    `rope_theta` / `rope_scaling` keys (transformers 4's)."""
    params = dict(config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise UserError("config.json has no rope_theta (nor rope_parameters.rope_theta); set it explicitly")
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        # llama3 / yarn scaling need extra tensors or keys we do not write: refuse rather than drift.
        raise UserError(f"config.json: rope scaling {rope_type!r} is not supported by the GGUF exporter")
    return float(theta), params


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) that splits text as tokenizer.json does.
    An unknown name fails the load and a wrong one silently changes token ids, so match exactly."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space", False):
        raise UserError(f"tokenizer.json: pre-tokenizer {kinds} is not byte-level BPE without prefix space; "
                        "the GGUF exporter only writes gpt2-style tokenizers")
    if kinds == ["Split", "ByteLevel"] and splits == [QWEN2_PRETOKENIZE_REGEX]:
        return "qwen2"
    if kinds == ["Split", "ByteLevel"] and splits == [LLAMA3_REGEX]:
        return "llama-bpe"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and byte_level[0].get("use_regex", True)):
        return "smollm"  # GPT-2 regex after splitting every digit
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return "gpt-2"
    raise UserError(f"tokenizer.json: no llama.cpp pre-tokenizer matches {kinds} {splits}; "
                    "supported: Qwen2, Llama 3, SmolLM2 and GPT-2 style")


def _merges(model: dict[str, Any]) -> list[str]:
    # tokenizers >= 0.20 writes merges as [a, b] pairs; GGUF wants "a b" strings
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _token_id(tok_cfg: dict[str, Any], key: str, vocab: dict[str, int]) -> int | None:
    value = tok_cfg.get(key)
    if isinstance(value, dict):  # AddedToken serialised as a dict
        value = value.get("content")
    return vocab.get(value) if isinstance(value, str) else None


def _first(x: Any) -> int | None:
    if isinstance(x, list):
        return x[0] if x else None
    return x


def _read_tokenizer(hf_dir: Path, config: dict[str, Any], n_rows: int) -> dict[str, Any]:
    from gguf import TokenType

    tj_path = hf_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise UserError(f"{hf_dir}: no tokenizer.json; the GGUF exporter needs a fast (tokenizers) tokenizer")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{tj_path}: tokenizer model {model.get('type')!r} is not supported (only byte-level BPE)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n_tok = max(vocab.values()) + 1
    if n_tok > n_rows:
        raise UserError(f"{tj_path}: {n_tok} tokens but the embedding has only {n_rows} rows")
    # The token list must have exactly one entry per embedding row: pad with unused tokens.
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types = [int(TokenType.UNUSED)] * n_rows
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            types[i] = int(TokenType.CONTROL if added[text].get("special") else TokenType.USER_DEFINED)
        else:
            types[i] = int(TokenType.NORMAL)

    cfg_path = hf_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    eos = _token_id(tok_cfg, "eos_token", vocab)
    eos = eos if eos is not None else _first(config.get("eos_token_id"))
    bos = _token_id(tok_cfg, "bos_token", vocab)
    bos = bos if bos is not None else _first(config.get("bos_token_id"))
    pad = _token_id(tok_cfg, "pad_token", vocab)
    pad = pad if pad is not None else _first(config.get("pad_token_id"))
    if eos is None:
        raise UserError(f"{hf_dir}: no EOS token in tokenizer_config.json or config.json; set eos_token")
    # llama.cpp falls back to token 11 for a missing BOS: point it at a real token instead.
    bos = bos if bos is not None else (vocab.get(ENDOFTEXT, eos))
    pad = pad if pad is not None else (vocab.get(ENDOFTEXT, eos))

    add_bos = tok_cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):  # fast tokenizers say it in the post-processor instead
        single = ((tj.get("post_processor") or {}).get("single") or [])
        add_bos = bool(single) and "SpecialToken" in single[0] and tokens[bos] == single[0]["SpecialToken"]["id"]

    template_file = hf_dir / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    else:
        template = tok_cfg.get("chat_template") if isinstance(tok_cfg.get("chat_template"), str) else None
    return {"tokens": tokens, "types": types, "merges": _merges(model), "bos": bos, "eos": eos, "pad": pad,
            "add_bos": add_bos, "pre": pre_tokenizer_name(tj), "chat_template": template or CHATML_JINJA,
            "n_tok": n_tok}


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of a head together; GGML's llama rope rotates neighbours."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _encode(name: str, data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """Cast one tensor to the output type: norms, biases and other 1-D tensors stay f32."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim < 2 or outtype == "f32":
        return data, Q.F32
    if outtype == "f16":
        return data.astype(np.float16), Q.F16
    if outtype == "bf16":
        return quants.quantize(data, Q.BF16), Q.BF16
    if data.shape[-1] % 32 != 0:  # q8_0 blocks are 32 wide; odd rows fall back to f16
        return data.astype(np.float16), Q.F16
    return quants.quantize(data, Q.Q8_0), Q.Q8_0


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype])


def _load_tensors(hf_dir: Path) -> dict[str, Any]:
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no *.safetensors weights to convert")
    out: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:  # "pt": numpy cannot read bf16
            for key in st.keys():
                out[key] = st.get_tensor(key)
    return out


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16", *,
            name: str = "model", progress: bool = True) -> ConvertResult:
    """Write `out_path` (atomically: a temp name, renamed when complete) from the HF folder."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    arch = gguf_architecture(config, str(hf_dir / "config.json"))
    theta, _ = _rope(config)
    dims = _dims(config)

    tensors = _load_tensors(hf_dir)
    n_rows = int(tensors["model.embed_tokens.weight"].shape[0])
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors
    tok = _read_tokenizer(hf_dir, config, n_rows)

    w = gguf.GGUFWriter(path=None, arch=arch)
    _add_hparams(w, config, dims, name=name, outtype=outtype, n_rows=n_rows, theta=theta)
    _add_tokenizer(w, tok)
    n_written = _add_tensors(w, tensors, hf_dir, arch, dims, tied=tied, outtype=outtype, progress=progress)
    _write_atomic(w, out_path, progress)
    return ConvertResult(path=out_path, architecture=arch, n_tensors=n_written, n_vocab=n_rows,
                         n_tokenizer=tok["n_tok"], pre_tokenizer=tok["pre"], bytes=out_path.stat().st_size)


@dataclass(frozen=True)
class _Dims:
    n_head: int
    n_kv: int
    hidden: int
    head_dim: int
    n_layers: int


def _dims(config: dict[str, Any]) -> _Dims:
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    n_layers = int(config["num_hidden_layers"])
    return _Dims(n_head, n_kv, hidden, head_dim, n_layers)


def _add_hparams(w: Any, config: dict[str, Any], d: _Dims, *, name: str, outtype: str, n_rows: int,
                 theta: float) -> None:
    w.add_name(name)
    w.add_file_type(_file_type(outtype))
    w.add_vocab_size(n_rows)
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(d.hidden)
    w.add_block_count(d.n_layers)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(d.n_head)
    w.add_head_count_kv(d.n_kv)  # default would be head_count: wrong for GQA
    w.add_rope_freq_base(theta)  # default would be 10000: wrong for Qwen2 (1e6)
    w.add_rope_dimension_count(d.head_dim)
    if d.head_dim != d.hidden // d.n_head:
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))


def _add_tokenizer(w: Any, tok: dict[str, Any]) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(int(tok["bos"]))
    w.add_eos_token_id(int(tok["eos"]))
    w.add_pad_token_id(int(tok["pad"]))
    w.add_add_bos_token(bool(tok["add_bos"]))
    w.add_add_eos_token(False)
    w.add_chat_template(tok["chat_template"])


def _add_tensors(w: Any, tensors: dict[str, Any], hf_dir: Path, arch: str, d: _Dims, *, tied: bool,
                 outtype: str, progress: bool) -> int:
    """Every tensor under its GGUF name, in name order; the number written."""
    import gguf
    from tqdm import tqdm

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                        d.n_layers)
    n_written = 0
    for hf_name in tqdm(sorted(tensors), desc="convert", unit="tensor", disable=not progress):
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # tied: llama.cpp reuses token_embd as the output matrix
        gg_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise UserError(f"{hf_dir}: tensor {hf_name} has no GGUF name for architecture {arch}")
        data = tensors[hf_name].float().numpy()
        if arch == "llama" and ".attn_q." in gg_name:
            data = _permute_qk(data, d.n_head)
        elif arch == "llama" and ".attn_k." in gg_name:
            data = _permute_qk(data, d.n_kv)
        encoded, qtype = _encode(gg_name, data, outtype)
        w.add_tensor(gg_name, encoded, raw_dtype=qtype)
        n_written += 1
    return n_written


def _write_atomic(w: Any, out_path: Path, progress: bool) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        os.replace(tmp, out_path)  # only a complete file gets the final name
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
