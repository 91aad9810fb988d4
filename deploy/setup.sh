#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv and install lowband with its test extra.
# Idempotent: a second run only checks. Usage: bash deploy/setup.sh [--python PYTHON]
# LOWBAND_EXTRAS: the extras to install (default "test"; CI uses "test,hf": the Hugging Face tests need transformers,
# which a node that does not use the Python API with Hugging Face models has no use for).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--python" ]; then PY=$2; fi
EXTRAS=${LOWBAND_EXTRAS:-test}
stamp=.venv/.lowband-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$(cat "$stamp")" = "$EXTRAS" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch first, bounded: an open range resolves to a multi-GB CUDA build on CPU-only machines.
# LOWBAND_TORCH_INDEX may point pip at a CPU-only wheel index where the default index has none.
.venv/bin/python -m pip install -q ${LOWBAND_TORCH_INDEX:+--index-url "$LOWBAND_TORCH_INDEX"} 'torch>=2.13.0,<2.14'
# hivemind only from its wheel: its sdist tries to download or build p2pd.
.venv/bin/python -m pip install -q --only-binary hivemind -e ".[$EXTRAS]"
.venv/bin/python -m pip check
echo "$EXTRAS" > "$stamp"
