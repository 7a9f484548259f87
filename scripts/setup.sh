#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with mimm-med and its test extras.
# The CPU wheel torch==2.13.0 lies on this class of machine's disk; installing it first keeps pip from
# pulling a multi-GB CUDA build to satisfy the project's torch range. Elsewhere the range decides.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0" \
  || .venv/bin/python -m pip install -q "torch>=2.4"
.venv/bin/python -m pip install -q -e ".[test]"
