# oneword CPU image: the CLI plus the preprocess, register and batch-planning steps, and the MLflow server.
# Build from the repository root, tagged with the package version (the pipelines' base_image default):
#   docker build -f docker/cpu.Dockerfile -t ghcr.io/oneword-ml/oneword:$(oneword --version) .
# Installs exactly what .ci/run installs: torch (CPU build) first, then requirements/runtime.lock, then oneword.

# The base is pinned by its exact version tag, which builds as is. To pin its content too, add the digest:
#   --build-arg PYTHON_DIGEST=@sha256:...   (from: docker buildx imagetools inspect python:3.11.14-slim-bookworm)
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG PYTHON_DIGEST=

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/oneword
ENV PATH=/opt/oneword/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY requirements/runtime.lock /tmp/runtime.lock
# MLflow's basic-auth app (`mlflow server --app-name basic-auth`, k8s/base/mlflow.yaml) needs mlflow[auth]:
# Flask-WTF and WTForms, at the pins of requirements/dev.lock (where CI tests the auth app); the rest of their
# requirements (Flask, itsdangerous, MarkupSafe) is in the runtime lock already.
RUN pip install -r /tmp/runtime.lock \
    && pip install --no-deps Flask-WTF==1.3.0 WTForms==3.3.2
COPY pyproject.toml README.md LICENSE NOTICE /src/
COPY src /src/src
RUN pip install --no-deps /src

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST}
LABEL org.opencontainers.image.title="oneword" \
      org.opencontainers.image.description="Textual Inversion as production software (CPU image)" \
      org.opencontainers.image.source="https://github.com/oneword-ml/oneword"
# /models is where the pipelines mount the model cache PVC (oneword-model-cache); without a volume the
# directory in the image is used, so it must be writable by the image's user. Group 0 may write what that user
# may: OpenShift runs the image as a random uid in group 0 (k8s/overlays/openshift).
RUN useradd --create-home --uid 10001 --gid 0 --shell /usr/sbin/nologin oneword \
    && mkdir -p /models/huggingface /models/oneword \
    && chown -R 10001:0 /models /home/oneword && chmod -R g=u /models /home/oneword
COPY --from=build /opt/oneword /opt/oneword
ENV PATH=/opt/oneword/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    HF_HOME=/models/huggingface \
    ONEWORD_CACHE=/home/oneword/.cache/oneword \
    ONEWORD_MODEL_CACHE=/models/oneword
USER 10001
WORKDIR /home/oneword
ENTRYPOINT ["oneword"]
CMD ["--help"]
