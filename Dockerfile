# aether-fast container image: docker build -t aether-fast . && docker run -p 8000:8000 -p 9090:9090 \
#     -e JWT_SECRET=... -v aether-data:/data aether-fast
#
# Stage 1 builds the wheel (Cython extension compiled here, with the full image's compiler and
# headers) and installs it into a virtual environment; stage 2 is a slim runtime that only
# copies that environment, plus Debian's redis-server: WORKERS=N without BROKER_URL runs it as
# the workers' private broker (docs/operations.md section 14). Configuration is by environment variables alone (docs/operations.md,
# section 3); tests/integration/test_operations.py lints this file and runs the build stage's
# RUN steps in a fresh venv.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/aether
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ext/ ext/
COPY aether_fast/ aether_fast/
# the JS client's one source: the wheel build copies it into the package (served at /client.js)
COPY clients/js/aether-client.js clients/js/
# build requirements (Cython, picows headers) come from [build-system] in pyproject.toml
RUN python -m pip wheel --no-deps --wheel-dir dist . \
    && python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install dist/aether_fast-*.whl \
    && "$VIRTUAL_ENV/bin/python" -I -c "import aether_fast._core"

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV VIRTUAL_ENV=/opt/aether \
    PATH=/opt/aether/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WS_HOST=0.0.0.0 \
    WS_PORT=8000 \
    METRICS_PORT=9090 \
    DATA_DIR=/data \
    SHUTDOWN_TIMEOUT_S=8
# redis-server: from Debian bookworm's own archive, whose security updates replace the version,
# so it is not pinned (a pinned version would stop building at the next point release)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && redis-server --version
RUN groupadd --system --gid 10001 aether \
    && useradd --system --uid 10001 --gid aether --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin aether \
    && mkdir /data \
    && chown aether:aether /data
COPY --from=build /opt/aether /opt/aether
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000 9090
# SIGTERM starts the graceful drain (close 1001 to every client, at most SHUTDOWN_TIMEOUT_S,
# 8 s here so it ends inside `docker stop`'s default 10 s; raise both together)
STOPSIGNAL SIGTERM
# GET /health on WS_PORT (https when TLS_CERT_FILE is set); degraded still counts as alive
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["aether-fast", "health", "--timeout", "4"]
ENTRYPOINT ["aether-fast"]
CMD ["serve"]
