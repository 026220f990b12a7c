# Sourced by the device scripts that start vLLM on the lent GPU host (torch + CUDA, no vLLM, no network):
# unpacks the shared vLLM 0.26.0 tree once, installs py-spy from a carried wheel, and writes /tmp/vpy, the
# vLLM server's Python (the machine's torch venv with the unpacked tree in front; vllm-gpu/README.md).
# Carry: .device/vllm-gpu (cp -r ../shared/vllm-gpu .device/), .whl (py-spy wheel, optional).
# Environment: PY (python3), VLLM_TREE (.device/vllm-gpu), VSITE (/tmp/vsite). Sets VPY=/tmp/vpy.
PY=${PY:-python3}
TREE=${VLLM_TREE:-.device/vllm-gpu}
VSITE=${VSITE:-/tmp/vsite}
VPY=/tmp/vpy
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total --format=csv,noheader
if [ ! -d "$VSITE/vllm" ]; then
  bash "$TREE/install.sh" "$TREE" "$VSITE" 2>&1 | grep -E "^==|passed|FAILED|FA3|Python.h|^torch|^0\." || true
fi
if ls .whl/py_spy*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/pyspy .whl/py_spy*.whl && export PATH=/tmp/pyspy/bin:$PATH
fi
echo "py-spy: $(command -v py-spy || echo missing)"
inc=""
[ -f "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
  || inc="export C_INCLUDE_PATH=$VSITE/_py312_include/python3.12; "
printf '#!/bin/sh\n%sexport PYTHONPATH=%s VLLM_USE_FLASHINFER_SAMPLER=0 TVM_FFI_DISABLE_TORCH_C_DLPACK=1\nexec %s "$@"\n' \
  "$inc" "$VSITE" "$(command -v $PY)" > "$VPY"
chmod +x "$VPY"
