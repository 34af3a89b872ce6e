# Untested here (no Docker engine on the build machines); see README.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 syncd
WORKDIR /app
COPY pyproject.toml README.md ./
COPY syncd ./syncd
COPY connectors ./connectors
COPY mappings ./mappings
RUN pip install --no-cache-dir . && chown -R syncd /app
USER syncd
EXPOSE 8080
ENTRYPOINT ["syncd", "run"]
CMD ["--config", "/app/config.toml"]
