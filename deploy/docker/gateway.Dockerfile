# syntax=docker/dockerfile:1.7
# arctl gateway (OpenAI-compatible front of SGLang workers; loads no torch). From the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t arctl-gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs libs
COPY services services
COPY cli cli
# The gateway needs none of torch's weight: install the package without dependencies, then only
# what the gateway imports.
RUN pip install --no-deps . && pip install "structlog>=24" "prometheus-client>=0.20" "pyyaml>=6" "protobuf>=7.35.1" "aiohttp>=3.9"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 arctl \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/arctl --create-home arctl
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 ARCTL_GATEWAY_HOST=0.0.0.0 ARCTL_GATEWAY_PORT=8080 ARCTL_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "arctl_gateway"]
