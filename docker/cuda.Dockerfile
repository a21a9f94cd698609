# oneword CUDA image: the GPU steps (cache_latents, train, evaluate, generate) and batch shards.
# Build from the repository root, tagged with the package version (the pipelines' base_image default):
#   docker build -f docker/cuda.Dockerfile -t ghcr.io/oneword-ml/oneword-cuda:$(oneword --version) .
# Installs exactly what .ci/run installs (requirements/runtime.lock), with the CUDA build of the same torch.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
# Pin by digest in production: docker buildx imagetools inspect nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG CUDA_DIGEST=sha256:0000000000000000000000000000000000000000000000000000000000000000

FROM ${CUDA_IMAGE}@${CUDA_DIGEST} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008  # the CUDA base pins the distribution; apt versions move with its security updates
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/oneword
ENV PATH=/opt/oneword/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY requirements/runtime.lock /tmp/runtime.lock
RUN pip install -r /tmp/runtime.lock
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install --no-deps /src

FROM ${CUDA_IMAGE}@${CUDA_DIGEST}
LABEL org.opencontainers.image.title="oneword-cuda" \
      org.opencontainers.image.description="Textual Inversion as production software (CUDA image)" \
      org.opencontainers.image.source="https://github.com/oneword-ml/oneword"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008  # see above
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin oneword
COPY --from=build /opt/oneword /opt/oneword
ENV PATH=/opt/oneword/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/oneword/.cache/huggingface \
    ONEWORD_CACHE=/home/oneword/.cache/oneword
USER 10001
WORKDIR /home/oneword
ENTRYPOINT ["oneword"]
CMD ["--help"]
