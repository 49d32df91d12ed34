# syntax=docker/dockerfile:1
# The glimpse-batch image for Ray on Kubernetes (deploy/rayjob.yaml) or any container cluster:
# Ubuntu 24.04's Python 3.12 in a venv, torch 2.13.0 for CUDA 12.8, this package with the `gpu`
# extra (flash-attn) and Ray, run as the non-root user `ray`.
#
#   docker build -t REGISTRY/glimpse-batch:TAG .      (BuildKit, the default builder since Docker 23)
#   docker push REGISTRY/glimpse-batch:TAG
#
# No CMD or ENTRYPOINT of ours: KubeRay replaces the container command with its own `ray start`.
# Two stages: flash-attn compiles against torch with nvcc, which only the CUDA *devel* image
# has; the first stage makes a wheel of it, the runtime stage installs only that wheel.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Keep deploy/rayjob.yaml's rayVersion equal to this.
ARG RAY_VERSION=2.60.0
ARG FLASH_ATTN_VERSION=2.8.3

# ---- stage 1: a flash-attn wheel built against this torch ----
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS flash-attn
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG FLASH_ATTN_VERSION
# Compile jobs (each takes several GiB of RAM) and GPU architectures (sm_80 code also runs on
# sm_86/sm_89: A10, L4, L40S); fewer of either makes a faster, smaller build.
ARG MAX_JOBS=4
ARG FLASH_ATTN_CUDA_ARCHS="80;90"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# flash-attn's setup.py imports torch, so it is built with --no-build-isolation, in this venv:
# that needs its build requirements here too (packaging, psutil, ninja, setuptools, wheel).
# It first looks for a matching prebuilt wheel on its GitHub releases, and compiles if none.
RUN pip install packaging psutil ninja setuptools wheel \
 && MAX_JOBS="${MAX_JOBS}" FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" \
    pip wheel --no-build-isolation --no-deps --wheel-dir /wheels "flash-attn==${FLASH_ATTN_VERSION}"

# ---- stage 2: the runtime image ----
# The runtime image, not cudnn-runtime: the torch wheels bring their own cuDNN and CUDA libraries.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG RAY_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# The same Python as the first stage (the wheel is built for it). wget: KubeRay's default health
# probes run `wget ... | grep success` in the container on operators or Ray versions without HTTP
# probes. ca-certificates: HTTPS to S3 and the Hugging Face hub.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv
# Also on PATH for login shells (bash -l resets PATH through /etc/profile on some bases).
RUN echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/venv.sh
# torch and Ray stay as pinned here: no later pip install in the image (nor a pip runtime_env on
# the cluster, which inherits PIP_CONSTRAINT) may swap them for another build.
RUN printf 'torch==%s\nray==%s\n' "${TORCH_VERSION}" "${RAY_VERSION}" > /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt
# torch first, pinned, from the CUDA 12.8 index (PyPI's default torch is another CUDA build).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# flash-attn from the first stage's wheel, so the `gpu` extra below is already satisfied.
RUN --mount=type=bind,from=flash-attn,source=/wheels,target=/tmp/wheels \
    pip install /tmp/wheels/flash_attn-*.whl
# The package with the `gpu` extra, not editable; its source is not kept in the image.
COPY pyproject.toml README.md /tmp/glimpse-batch/
COPY pipeline /tmp/glimpse-batch/pipeline
COPY jobs /tmp/glimpse-batch/jobs
COPY schemas /tmp/glimpse-batch/schemas
RUN pip install "/tmp/glimpse-batch[gpu]" "ray[data,default]==${RAY_VERSION}" \
 && rm -rf /tmp/glimpse-batch

# A non-root user `ray` (uid 1000, as in Ray's own images; Ubuntu 24.04's `ubuntu` user had it).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --shell /bin/bash ray \
 && mkdir -p /home/ray/.cache/huggingface \
 && chown -R ray:ray /home/ray/.cache
# Hub downloads go here (deploy/rayjob.yaml mounts a volume on it).
ENV HF_HOME=/home/ray/.cache/huggingface
USER ray
WORKDIR /home/ray
