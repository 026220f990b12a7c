# The probe image, common to every allocator (harness.images builds it; see docker/README.md).
# Build context: a staged directory holding wheels/ (the host wheelhouse) and harness/ (probe code).
#   runtime : BASE_IMAGE + a python3 that can make venvs (apt-get only where the base lacks it)
#   build   : a venv filled from the wheelhouse, no network (pip --no-index)
#   probe   : runtime + that venv + the probe code; no wheels, no pip caches
# BASE_IMAGE: a CUDA PyTorch base on NVIDIA hosts (its torch is kept: the venv sees system
# site-packages), the local debootstrap base (docker/base/build-base.sh) where there is no GPU.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE} AS runtime
RUN set -eu; \
    if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 --version

FROM runtime AS build
COPY wheels/ /tmp/wheels/
RUN python3 -m venv --system-site-packages /opt/venv \
 && /opt/venv/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels \
      -r /tmp/wheels/requirements.txt \
 && /opt/venv/bin/python -c 'import torch, transformers, tokenizers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM runtime AS probe
COPY --from=build /opt/venv /opt/venv
COPY harness/ /opt/harness/harness/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/harness \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /opt/harness
ENTRYPOINT ["python", "-m", "harness.probe"]
