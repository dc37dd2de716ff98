# syntax=docker/dockerfile:1
# One image for the gateway, the resolver and the mock CRM; the command picks the service:
#   agi-gateway (default) | crm-resolver | callerid-mock-crm --listen ... --table ...
# PYTHON_BASE: the official image by default; where no registry is reachable, `make image`
# passes the stand-in tools/container/build_bases.sh builds offline from Debian's Python 3.11
# (deploy/images/python/Dockerfile). Both stages must use the same one.
ARG PYTHON_BASE=python:3.11-slim
# The runtime dependencies, read from pyproject.toml. A stage of its own so that the build
# stage's copy of the list is what its cache is keyed on: editing the dev extras or the
# tool settings in pyproject.toml does not reinstall the dependencies.
FROM ${PYTHON_BASE} AS requirements
COPY pyproject.toml /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
      >/requirements.txt

# Build stage: install the project and its dependencies into a self-contained virtualenv,
# the dependencies first (their layer stays cached until the list changes, so a code change
# rebuilds in seconds). Byte-code is compiled here because the runtime root is read-only.
FROM ${PYTHON_BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/callerid \
 && /opt/callerid/bin/pip install --compile -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY services ./services
COPY shared ./shared
COPY tools ./tools
RUN /opt/callerid/bin/pip install --compile --no-deps . \
 && /opt/callerid/bin/pip uninstall --yes pip setuptools

# Runtime stage: the same base (the venv's interpreter path must match), no build tools,
# no pip, a fixed non-root uid so Kubernetes' runAsNonRoot can verify it.
FROM ${PYTHON_BASE}
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
