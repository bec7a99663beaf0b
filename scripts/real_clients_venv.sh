#!/usr/bin/env bash
# Creates (once) a separate virtualenv holding the real third-party clients our servers must serve
# unchanged -- lmdeploy 0.5.1's APIClient / Chatbot and lagent 0.2.4's wrappers -- and prints its python.
#
#   python=$(scripts/real_clients_venv.sh)
#
# Never installed into the project's .venv: lmdeploy would shadow nothing of ours, but its pins
# (numpy<2, transformers 4.46) would. The venv lives under the user cache folder and is reused while
# its stamp (the pinned set below) is unchanged. LMWRAP_REAL_CLIENTS_VENV overrides the location.
set -euo pipefail

PY_BASE=${PYTHON:-python3}
VENV=${LMWRAP_REAL_CLIENTS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lmwrap/real-clients-venv}

# lmdeploy 0.5.1: the one release with both the HTTP APIClient and the Triton Chatbot (see real_clients.md).
NO_DEPS=(lmdeploy==0.5.1 lagent==0.2.4)
DEPS=(
  torch==2.13.0 "numpy<2" transformers==4.46.3 "pydantic>2" mmengine-lite requests "tritonclient[grpc]"
  # lagent 0.2.4's minimal set: lagent/__init__ imports every action and agent.
  phx-class-registry==4.1.0 "griffe<1.0" beautifulsoup4 cachetools filelock timeout-decorator jsonschema
  termcolor func-timeout typing-extensions duckduckgo-search==5.3.1b1
)
STAMP_TEXT="v1 ${NO_DEPS[*]} | ${DEPS[*]}"
STAMP="$VENV/.lmwrap-real-clients"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" && -x "$VENV/bin/python" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
# One installer at a time (two test sessions may start together).
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
  "$VENV/bin/python" -m pip install -q "${DEPS[@]}"
  "$VENV/bin/python" -m pip install -q --no-deps "${NO_DEPS[@]}"
  "$VENV/bin/python" - <<'EOF'
import lmdeploy.serve.openai.api_client  # noqa: F401
from lagent.llms import LMDeployClient  # noqa: F401
from lagent.llms.lmdeploy_wrapper import TritonClient  # noqa: F401
EOF
  echo "$STAMP_TEXT" > "$STAMP"
} >&2

echo "$VENV/bin/python"
