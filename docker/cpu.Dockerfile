# oneword CPU image: the CLI plus the preprocess, register and batch-planning steps.
# Build from the repository root, tagged with the package version (the pipelines' base_image default):
#   docker build -f docker/cpu.Dockerfile -t ghcr.io/oneword-ml/oneword:$(oneword --version) .
# Installs exactly what .ci/run installs: torch (CPU build) first, then requirements/runtime.lock, then oneword.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# Pin by digest in production: docker buildx imagetools inspect python:3.11.11-slim-bookworm
ARG PYTHON_DIGEST=sha256:0000000000000000000000000000000000000000000000000000000000000000

FROM ${PYTHON_IMAGE}@${PYTHON_DIGEST} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/oneword
ENV PATH=/opt/oneword/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY requirements/runtime.lock /tmp/runtime.lock
RUN pip install -r /tmp/runtime.lock
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install --no-deps /src

FROM ${PYTHON_IMAGE}@${PYTHON_DIGEST}
LABEL org.opencontainers.image.title="oneword" \
      org.opencontainers.image.description="Textual Inversion as production software (CPU image)" \
      org.opencontainers.image.source="https://github.com/oneword-ml/oneword"
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin oneword
COPY --from=build /opt/oneword /opt/oneword
ENV PATH=/opt/oneword/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/oneword/.cache/huggingface \
    ONEWORD_CACHE=/home/oneword/.cache/oneword
USER 10001
WORKDIR /home/oneword
ENTRYPOINT ["oneword"]
CMD ["--help"]
