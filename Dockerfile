# syntax=docker/dockerfile:1
#
# internvl-serve on one NVIDIA GPU.
#
#   docker build -t internvl-serve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v internvl-hf-cache:/models \
#     -e INTERNVL_MODEL=OpenGVLab/InternVL3-1B -e INTERNVL_API_KEY=change-me internvl-serve:0.1.0
#
# Base image: the CUDA *base* flavour, pinned, for CUDA 13.0 because PyPI's torch 2.13.0 Linux wheel is
# built against CUDA 13.0. We skip the -runtime and -cudnn-runtime flavours on purpose: the torch wheel
# brings its own cuBLAS, cuDNN, NCCL and friends as nvidia-* wheels, so those flavours would ship a
# second ~3 GB copy. The base flavour still gives the CUDA runtime, the NVIDIA_* variables the container
# toolkit reads to mount the driver, and NVIDIA_REQUIRE_CUDA, which refuses a too-old driver with a
# clear message. For a CUDA 12.x driver, build with a matching pair, e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Both stages use the same image, so the venv's interpreter symlink resolves in the final stage.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ---- builder: compilers and headers live here only ---------------------------------------------
FROM ${CUDA_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu's own python3 is the interpreter the final stage gets too; apt versions follow the pinned
# base image's release, so they are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: the largest download and the one that changes least.
# PyTorch's own wheel indexes (download.pytorch.org/whl/cuXYZ) also carry torch's dependencies.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY model_runtime/ model_runtime/
COPY batch/ batch/
# A regular (not editable) install: the package lands in the venv and /src stays behind.
RUN pip install --no-cache-dir /src

# ---- runtime: interpreter, tini, the venv; no compilers -----------------------------------------
FROM ${CUDA_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# tini is PID 1: it forwards SIGTERM to the server (its child) and reaps the zombies of preprocessing
# helpers. The server drains in-flight requests on SIGTERM, then exits 0.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 internvl \
 && useradd --uid 10001 --gid internvl --create-home --home-dir /home/internvl \
      --shell /usr/sbin/nologin internvl \
 && mkdir -p /models \
 && chown internvl:internvl /models

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models \
    INTERNVL_HOST=0.0.0.0 \
    INTERNVL_PORT=8000
# Only the bind address is preset (it must match EXPOSE and HEALTHCHECK whatever CMD becomes). The
# environment outranks a --config file, so an INTERNVL_MODEL default here would silently override
# the Kubernetes ConfigMap: pass the model with -e INTERNVL_MODEL=... or --model.

# The Hugging Face cache: mount a named volume or a PVC here so weights survive restarts.
VOLUME ["/models"]

USER 10001:10001
WORKDIR /home/internvl
EXPOSE 8000
STOPSIGNAL SIGTERM

# /health answers 200 only once the model is loaded and warm, 503 otherwise; urllib raises on both a
# 503 and a refused connection, so the exit code says it all. No proxy: an HTTP_PROXY set for model
# downloads must not swallow the loopback check. start-period covers the model load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=4)"]

# Exec form: no shell in between, so SIGTERM reaches tini and through it the server.
# `docker run IMAGE --model X` replaces CMD; INTERNVL_HOST/PORT above keep the bind address then.
ENTRYPOINT ["tini", "--", "internvl-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
