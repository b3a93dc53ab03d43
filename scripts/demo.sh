#!/usr/bin/env bash
# The main job on the embedded default: tiny Qwen2 made from scratch, rule teacher, no Ollama,
# no GPU, nothing from a hub. Sets up .venv on first use. Extra arguments go to `rlhf pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${RLHF_VENV:-.venv}/bin/rlhf" pipeline --config configs/demo.yaml "$@"
