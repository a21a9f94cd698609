# oneword CUDA image: the GPU steps (cache_latents, train, evaluate, generate) and batch shards.
# Build from the repository root, tagged with the package version (the pipelines' base_image default):
#   docker build -f docker/cuda.Dockerfile -t ghcr.io/oneword-ml/oneword-cuda:$(oneword --version) .
# Installs exactly what .ci/run installs (requirements/runtime.lock), with the CUDA build of the same torch.
#
# One CUDA stack: torch's cu128 wheels bring the CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* pip packages
# and load them from the venv, so an nvidia/cuda base would only add a second, unused copy of the same
# libraries (several GB) that can also differ in version from what torch was built against. The driver
# (libcuda) is not in any image: the NVIDIA container toolkit / GPU Operator mounts the host's into the
# container. Hence a plain Python base; the host driver must support CUDA 12.8 (R570 or newer).

# The base is pinned by its exact version tag, which builds as is. To pin its content too, add the digest:
#   --build-arg PYTHON_DIGEST=@sha256:...   (from: docker buildx imagetools inspect python:3.11.14-slim-bookworm)
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG PYTHON_DIGEST=

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/oneword
ENV PATH=/opt/oneword/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY requirements/runtime.lock /tmp/runtime.lock
RUN pip install -r /tmp/runtime.lock
COPY pyproject.toml README.md LICENSE NOTICE /src/
COPY src /src/src
RUN pip install --no-deps /src

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST}
LABEL org.opencontainers.image.title="oneword-cuda" \
      org.opencontainers.image.description="Textual Inversion as production software (CUDA image)" \
      org.opencontainers.image.source="https://github.com/oneword-ml/oneword"
# /models is where the pipelines mount the model cache PVC (oneword-model-cache); without a volume the
# directory in the image is used, so it must be writable by the image's user. torch.compile keeps its cache there
# too, so that only the first train task on a cluster compiles from nothing. Group 0 may write what the user
# may: OpenShift runs the image as a random uid in group 0 (k8s/overlays/openshift).
# torch.compile's Triton builds a small launcher for its kernels with the system's C compiler, at run time
# hadolint ignore=DL3008  # the compiler of the pinned base image's Debian release; its patch versions come and go
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --gid 0 --shell /usr/sbin/nologin oneword \
    && mkdir -p /models/huggingface /models/torchinductor /models/oneword \
    && chown -R 10001:0 /models /home/oneword && chmod -R g=u /models /home/oneword
COPY --from=build /opt/oneword /opt/oneword
# What the NVIDIA container toolkit reads to mount the driver's libraries. No NVIDIA_VISIBLE_DEVICES: the device
# plugin sets it to the GPUs the pod was given; an image-wide "all" would show every GPU of the node to a pod that
# asked for none, beside the pods the scheduler gave them to.
# Where GKE's own driver installer (no GPU Operator) mounts libcuda and nvidia-smi, on no loader path of its own:
# without these, torch finds no GPU there and the GPU steps run on the CPU. As nvidia/cuda images set them; a
# folder that is not there costs nothing.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=12.8" \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    PATH=/opt/oneword/bin:/usr/local/nvidia/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    HF_HOME=/models/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/models/torchinductor \
    ONEWORD_CACHE=/home/oneword/.cache/oneword \
    ONEWORD_MODEL_CACHE=/models/oneword
USER 10001
WORKDIR /home/oneword
ENTRYPOINT ["oneword"]
CMD ["--help"]
