#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment. torch==2.13.0 goes in first: on these
# machines that pin is a local CPU build, while a bare `torch` requirement pulls a multi-GB CUDA
# build. Every package is then pinned by requirements.lock (pip constraints), so a fresh machine
# gets the set the README's numbers were measured with. Usage: scripts/setup_env.sh [extras]
# (e.g. "dev"; default: none)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLHF_VENV:-.venv}"
EXTRAS="${1:-}"
SPEC="."
[ -n "$EXTRAS" ] && SPEC=".[$EXTRAS]"
STAMP="$VENV/.rlhf-installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)-${EXTRAS:-base}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c requirements.lock -e "$SPEC"
  touch "$STAMP"
fi
