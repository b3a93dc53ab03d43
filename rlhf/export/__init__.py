"""`rlhf export`: merge a LoRA policy into its base, write a GGUF and a Modelfile, optionally push
the model to Ollama.

Outputs in --output_dir: hf/ (the merged Hugging Face folder), NAME.gguf, Modelfile, metrics.json.
Without --push it prints the `ollama create` command to run; with --push it uploads the GGUF to the
Ollama server and creates the model there (an existing one is replaced only with --force true).
An existing hf/ is replaced only when rlhf wrote it (or with --overwrite true).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.config import SEED, field
from rlhf.errors import UserError
from rlhf.io import atomic_write_text, check_removable, write_metrics
from rlhf.ollama.names import default_name, file_stem, is_valid_name


@dataclass
class ExportConfig:
    model: str = field(help="what to export: a model folder, a LoRA adapter folder, a .gguf, a Hub id or a "
                            "short name (smollm2-135m)")
    output_dir: str = field("runs/export", help="folder for hf/, NAME.gguf, Modelfile and metrics.json")
    seed: int = field(0, help="unused (export is deterministic); kept for the stage convention", **SEED)
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = field("f16", help="GGUF weight type (norms stay f32)")
    name: str | None = field(None, help="Ollama model name (default: from the model's folder name)")
    push: bool = field(False, help="upload the GGUF and create the model on the Ollama server")
    ollama_host: str | None = field(None, help="Ollama URL (default: $OLLAMA_HOST, else http://127.0.0.1:11434)")
    force: bool = field(False, help="with --push, replace an existing model of the same name")
    system: str | None = field(None, help="SYSTEM prompt (default: the one the model's chat template adds, if any)")
    temperature: float | None = field(None, help="PARAMETER temperature (0: greedy)", min=0)
    top_p: float | None = field(None, help="PARAMETER top_p", gt=0, max=1)
    top_k: int | None = field(None, help="PARAMETER top_k (0: off)", min=0)
    num_ctx: int | None = field(None, help="PARAMETER num_ctx (context window Ollama allocates)", min=1)
    repeat_penalty: float | None = field(None, help="PARAMETER repeat_penalty (1: off)", gt=0)
    verify_data: str | None = field(None, help="held-out prompts (a data folder's test.jsonl, or a .jsonl) on which "
                                               "llama.cpp's greedy answers from the GGUF are compared with the merged "
                                               "model's; null skips the check")
    verify_prompts: int = field(100, help="how many of those prompts to check", min=1)
    verify_max_new_tokens: int = field(48, help="greedy answer length in the check", min=1)
    progress: bool = field(True, help="show progress bars")
    overwrite: bool = field(False, help="replace an hf/ folder in --output_dir that rlhf did not write (no "
                                        ".rlhf-owned in it): the files of your own there are lost")

    def validate(self) -> None:
        if self.name is not None and not is_valid_name(self.name):
            raise UserError(f"--name {self.name!r}: an Ollama name is lowercase letters, digits, '.', '_', '-' "
                            "(optionally namespace/ and :tag), e.g. chip-advisor:latest")
        if self.system is not None:
            from rlhf.export.modelfile import check_block

            check_block("SYSTEM", self.system, "--system")


@dataclass
class _Merged:
    """What step 1 hands on: the merged hf/ folder and everything decided before writing the GGUF."""

    lora: bool
    hf_dir: Path
    gguf_path: Path
    system: str | None
    params: dict[str, Any]
    mf_text: str


def _merge(cfg: ExportConfig, name: str, out: Path) -> _Merged:
    """Load (LoRA merged), check we can convert it before writing anything, keep hf/."""
    from rlhf.export import gguf, merge, modelfile

    lora = merge.is_lora(cfg.model)
    model, tok = merge.load_merged(cfg.model)
    gguf.gguf_architecture(model.config.to_dict(), f"{cfg.model}: config.json")  # fail before writing
    system = cfg.system if cfg.system is not None else modelfile.default_system(tok, cfg.model)
    gguf_path = out / f"{file_stem(name)}.gguf"
    params = modelfile.parameters(modelfile.STOPS, cfg.temperature, cfg.top_p, cfg.top_k, cfg.num_ctx,
                                  cfg.repeat_penalty)
    # rendered before writing anything: a text the Modelfile cannot hold is refused, not half-exported
    mf_text = modelfile.render(gguf_path.name, modelfile.CHATML_TEMPLATE, params, system, cfg.model,
                               system_source="--system" if cfg.system is not None else
                               f"{cfg.model}: the system prompt of its chat template (override it with --system)")
    hf_dir = merge.save_hf(model, tok, out / "hf", overwrite=cfg.overwrite)
    del model  # free the merged weights before the converter loads them again from hf/
    return _Merged(lora, hf_dir, gguf_path, system, params, mf_text)


def _push_or_say(cfg: ExportConfig, name: str, m: _Merged, mf_path: Path,
                 seconds: dict[str, float]) -> dict[str, Any] | None:
    """Push to Ollama with --push (its result), else print the `ollama create` command (None)."""
    from rlhf.export import modelfile

    pushed: dict[str, Any] | None = None
    if cfg.push:
        from rlhf.export import push

        t = time.perf_counter()
        pushed = push.push(m.gguf_path, name, template=modelfile.CHATML_TEMPLATE, params=m.params, system=m.system,
                           host=cfg.ollama_host, force=cfg.force, progress=cfg.progress)
        seconds["push"] = round(time.perf_counter() - t, 2)
        print(f"created Ollama model {name} at {pushed['host']}: run `ollama run {name}`")
    else:
        print(f"GGUF written to {m.gguf_path}; to use it in Ollama run:\n"
              f"  ollama create {name} -f {shlex.quote(str(mf_path))}")
    return pushed


def _verify(cfg: ExportConfig, m: _Merged, seconds: dict[str, float]) -> dict[str, Any]:
    """llama.cpp on the GGUF against transformers on hf/, greedy, on held-out prompts (rlhf.export.verify)."""
    from rlhf.data.schema import PROMPT_COLUMNS, load_rows, resolve_split
    from rlhf.export.verify import verify_gguf

    t = time.perf_counter()
    rows = load_rows(resolve_split(cfg.verify_data, "test"), PROMPT_COLUMNS)[: cfg.verify_prompts]
    prompts = [r["prompt"] for r in rows]
    check = verify_gguf(m.hf_dir, m.gguf_path, prompts, max_new_tokens=cfg.verify_max_new_tokens)
    seconds["verify"] = round(time.perf_counter() - t, 2)
    print(f"GGUF check on {check['prompts']} held-out prompts (llama.cpp vs transformers, greedy): "
          f"answers identical {check['answers_identical']:.0%}, actions {check['actions_identical']:.0%}, "
          f"prompt tokens {check['tokenization_identical']:.0%}")
    if check["tokenization_identical"] < 1 or check["answers_identical"] < 0.95:
        print(f"warning: the GGUF does not answer as the model it came from; first difference: "
              f"{check['first_difference']}")
    return check


def run(cfg: ExportConfig) -> dict[str, Any]:
    from rlhf.export import gguf

    start = time.perf_counter()
    cfg.validate()
    if cfg.verify_data is not None:
        from rlhf.data.schema import resolve_split

        # a missing file fails now, not after the conversion; here, not in validate, which the
        # pipeline calls before its data stage has written the file
        resolve_split(cfg.verify_data, "test")
    name = cfg.name or default_name(cfg.model)
    out = Path(cfg.output_dir)
    check_removable(out / "hf", force=cfg.overwrite)  # before the slow part, not after it
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    m = _merge(cfg, name, out)
    seconds["merge"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    conv = gguf.convert(m.hf_dir, m.gguf_path, cfg.outtype, name=name, progress=cfg.progress)
    seconds["convert"] = round(time.perf_counter() - t, 2)

    check = _verify(cfg, m, seconds) if cfg.verify_data else None

    mf_path = out / "Modelfile"  # beside the GGUF, which it names by file name
    atomic_write_text(mf_path, m.mf_text)
    pushed = _push_or_say(cfg, name, m, mf_path, seconds)
    seconds["total"] = round(time.perf_counter() - start, 2)

    metrics: dict[str, Any] = {
        "name": name, "model": cfg.model, "lora_merged": m.lora, "architecture": conv.architecture,
        "outtype": cfg.outtype, "gguf": str(m.gguf_path), "gguf_bytes": conv.bytes, "n_tensors": conv.n_tensors,
        "n_vocab": conv.n_vocab, "n_tokenizer": conv.n_tokenizer, "pre_tokenizer": conv.pre_tokenizer,
        "hf_dir": str(m.hf_dir), "modelfile": str(mf_path), "system": m.system, "parameters": m.params,
        "pushed": pushed is not None, "seconds": seconds,
    }
    if check:
        metrics["gguf_check"] = check
    if pushed:
        metrics.update(ollama_host=pushed["host"], digest=pushed["digest"], uploaded=pushed["uploaded"],
                       replaced=pushed["replaced"])
    write_metrics(out, metrics)
    return metrics
