"""Which precision a model computes in: `dtype: auto` picks bf16 only where it is faster.

bf16 pays only on hardware with bf16 matrix units: GPUs, and CPUs with AVX512-BF16 or AMX.
Without them PyTorch emulates bf16 and it is much slower than f32 (measured on an AVX2-only EPYC,
SmolLM2-135M forward at 8 x 100 tokens: f32 1.81 s, bf16 autocast 11.75 s; on an EPYC with
AVX512-BF16 the same forward went 1.5 -> 0.7 s in bf16).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

DTYPE_HELP = "float32 | bfloat16 | float16 | auto (bf16 where the GPU or CPU has bf16 units, else f32)"
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@cache
def bf16_is_fast() -> bool:
    """True on a GPU with bf16 support, or a CPU whose flags include AVX512-BF16 or AMX-BF16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume no bf16 units; say bfloat16 explicitly to force it
        return False
    return bool(_cpu_flags(cpuinfo) & _CPU_BF16_FLAGS)


def resolve_dtype(name: str) -> str:
    """`auto` -> bfloat16 where bf16 is fast (see bf16_is_fast), else float32; others unchanged."""
    if name != "auto":
        return name
    return "bfloat16" if bf16_is_fast() else "float32"
