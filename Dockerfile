# The syncd image: `syncd run` as a non-root user, with the versions CI tests (constraints.txt).
# It is not built in this project's CI (the build machines have no Docker engine); see
# docs/deployment.md for how to run it.
#
#   docker build -t syncd .
#   docker run --name syncd --stop-timeout 30 -p 8080:8080 \
#     -v syncd-data:/var/lib/syncd \
#     -v "$PWD/config.toml:/etc/syncd/config.toml:ro" -v "$PWD/mappings:/etc/syncd/mappings:ro" \
#     --env-file syncd.env syncd

# A pinned tag: a rebuild gets the same Python and Debian until this line changes.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --create-home --uid 10001 --user-group syncd \
 && mkdir -p /var/lib/syncd /etc/syncd \
 && chown syncd:syncd /var/lib/syncd

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY syncd ./syncd
COPY connectors ./connectors
COPY mappings ./mappings
RUN pip install -c constraints.txt .

# The database lives in the volume: the default database_url, sqlite:///./syncd.db, is
# relative to the working directory. Use PostgreSQL for several replicas.
WORKDIR /var/lib/syncd
VOLUME ["/var/lib/syncd"]
USER syncd

# Inside a container syncd must listen on every interface; the config file may still set
# another port, but the health check below asks port 8080.
ENV SYNCD_DAEMON__LISTEN=0.0.0.0:8080 \
    SYNCD_CONFIG=/etc/syncd/config.toml
EXPOSE 8080

# /readyz answers 200 once the database answers and the workers run, 503 otherwise
# (README.md); urlopen raises on a 503, which exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]

# SIGTERM drains in-flight work; give it 30 s or more (docker run --stop-timeout 30,
# compose stop_grace_period: 30s), never Docker's default 10 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncd", "run"]
CMD ["--config", "/etc/syncd/config.toml"]
