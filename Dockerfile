# syntax=docker/dockerfile:1
# pdg, the Public Data Gateway: `docker build -t pdg .`, then
#   docker run -p 8080:8080 -e PDG_DATABASE_URL=… -e PDG_REDIS_URL=… pdg
# (without them it runs on the embedded defaults in /var/lib/pdg).

# -- build: the package and its dependencies, in a venv ------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/pdg
COPY pyproject.toml README.md ./
COPY billing billing
COPY cli cli
COPY config config
COPY console console
COPY core core
COPY gateway gateway
COPY ledger ledger
COPY licensing licensing
COPY metering metering
COPY samples samples
COPY storage storage
# The [sm] extra: SM2/SM3 signatures (Tongsuo's bindings, a wheel); [otel]:
# OpenTelemetry traces over OTLP/HTTP (tracing.otlp_endpoint).
RUN /opt/pdg/bin/pip install ".[sm,otel]" && /opt/pdg/bin/pip uninstall --yes pip

# -- run: the venv only, as an unprivileged user --------------------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="pdg" \
      org.opencontainers.image.description="The Public Data Gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pdg \
 && useradd --system --uid 10001 --gid pdg --home-dir /var/lib/pdg --create-home --shell /usr/sbin/nologin pdg \
 && chmod 0700 /var/lib/pdg
COPY --from=build /opt/pdg /opt/pdg
ENV PATH=/opt/pdg/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PDG_DATA_DIR=/var/lib/pdg \
    PDG_HOST=0.0.0.0 \
    PDG_PORT=8080
USER 10001:10001
WORKDIR /var/lib/pdg
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["pdg"]
CMD ["serve"]
