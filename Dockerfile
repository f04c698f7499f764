# syntax=docker/dockerfile:1
# Creditline: build stage compiles the package (and its Cython kernels, when the tree has
# them: pyproject's build-system pulls Cython in) into wheels and installs them into a
# virtual environment; the runtime stage copies that environment and runs as a non-root
# user. Both stages use the same base image, so the venv's interpreter path holds.
#
# Safe as shipped: the server listens on every address of the container with mutual TLS
# (client certificates, roles enforced), from /etc/creditline/tls: ca.crt, server.crt,
# server.key, and health.crt/.key for the health check. Without them it does not start.
# A first-try CA and certificates (deploy/make_certs.sh, installed as creditline-make-certs),
# made into a volume and used from there:
#
#   docker build -t creditline .
#   docker run --rm -v creditline-tls:/etc/creditline/tls --entrypoint creditline-make-certs \
#       creditline /etc/creditline/tls
#   docker run -d --name creditline -p 50051:50051 -v creditline-tls:/etc/creditline/tls \
#       creditline                                       # embedded Redis (private socket)
#   docker cp creditline:/etc/creditline/tls ./tls        # ca.crt and the client certificates
#   docker compose up                                     # Redis + server + collector
#   deploy/check_image_steps.sh      # these steps without a Docker engine, as non-root

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# a C compiler for the Cython kernels and any dependency without a wheel
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
# 1. wheels: the project (compiled) and every dependency
RUN python -m pip wheel --wheel-dir /wheels .
# 2. the runtime environment, from those wheels only
RUN python -m venv /opt/creditline \
 && /opt/creditline/bin/pip install --no-index --find-links /wheels creditline
# 3. fail the build if the install cannot start: imports, plan, compiled kernels if any
RUN /opt/creditline/bin/python -c "import creditline.api.app, creditline.cli" \
 && /opt/creditline/bin/python -c "import importlib.util as u, sys; \
spec = u.find_spec('creditline.native'); \
sys.exit(0) if spec is None else __import__('creditline.native.kernels')" \
 && /opt/creditline/bin/creditline serve --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 creditline \
 && useradd --system --uid 10001 --gid creditline --home-dir /var/lib/creditline \
            --create-home --shell /usr/sbin/nologin creditline
COPY --from=build /opt/creditline /opt/creditline
# the first-try certificates' maker (openssl comes with the base image's ca-certificates),
# and their directory, the creditline user's only (a named volume mounted there keeps it)
COPY --chmod=0755 deploy/make_certs.sh /usr/local/bin/creditline-make-certs
RUN openssl version \
 && install -d -m 0700 -o creditline -g creditline /etc/creditline/tls
ENV PATH=/opt/creditline/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CREDITLINE_LISTEN_ADDRESS=0.0.0.0:50051 \
    CREDITLINE_TLS_CERT_FILE=/etc/creditline/tls/server.crt \
    CREDITLINE_TLS_KEY_FILE=/etc/creditline/tls/server.key \
    CREDITLINE_TLS_CLIENT_CA_FILE=/etc/creditline/tls/ca.crt \
    CREDITLINE_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/creditline
# gRPC; Prometheus when CREDITLINE_METRICS_LISTEN_ADDRESS is set (e.g. 0.0.0.0:9464)
EXPOSE 50051 9464
# the gRPC health service, over mutual TLS with the health certificate (no role: health
# only)
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["creditline", "health", "--server", "127.0.0.1:50051", "--timeout-s", "4", \
       "--tls-ca-file", "/etc/creditline/tls/ca.crt", \
       "--tls-cert-file", "/etc/creditline/tls/health.crt", \
       "--tls-key-file", "/etc/creditline/tls/health.key"]
# SIGTERM (docker stop): health goes NOT_SERVING, calls in flight get shutdown_grace_s;
# give docker stop a longer timeout than that grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["creditline"]
CMD ["serve"]
