# syntax=docker/dockerfile:1
# One image for the gateway, the resolver and the mock CRM; the command picks the service:
#   agi-gateway (default) | crm-resolver | callerid-mock-crm --listen ... --table ...
# Build stage: install the project and its dependencies into a self-contained virtualenv.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY shared ./shared
COPY tools ./tools
# Byte-code is compiled here because the runtime root filesystem is read-only.
RUN python -m venv /opt/callerid \
 && /opt/callerid/bin/pip install --compile . \
 && /opt/callerid/bin/pip uninstall --yes pip setuptools

# Runtime stage: the same base (the venv's interpreter path must match), no build tools,
# no pip, a fixed non-root uid so Kubernetes' runAsNonRoot can verify it.
FROM python:3.11-slim
ENV PATH=/opt/callerid/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 callerid \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin callerid
COPY --from=build /opt/callerid /opt/callerid
COPY examples /app/examples
WORKDIR /app
USER 10001:10001
# 4573 FastAGI, 9100 gateway HTTP, 9101 resolver HTTP, 8081 mock CRM.
EXPOSE 4573 9100 9101 8081
STOPSIGNAL SIGTERM
CMD ["agi-gateway"]
