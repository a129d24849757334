# syntax=docker/dockerfile:1
# The worker image: a Celery worker on the `gpu` queue with torch's CUDA build.
#
#   docker build -f docker/worker.Dockerfile -t crucible-worker .
#
# The GPU comes from the host at run time (NVIDIA driver + NVIDIA Container Toolkit; compose
# reserves it with deploy.resources.reservations.devices). The torch wheel brings its own
# CUDA libraries (nvidia-* wheels); the CUDA runtime base supplies the rest of the userland
# the NVIDIA runtime expects. Ubuntu 22.04 has no maintained CPython 3.11 package, so uv
# installs a pinned python-build-standalone 3.11 under /opt/python in the builder stage;
# that build is relocatable and the runtime stage copies it to the same path.

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS builder

COPY --from=ghcr.io/astral-sh/uv:0.9.24 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    VIRTUAL_ENV=/opt/venv

WORKDIR /src
RUN uv python install 3.11.14 && uv venv --python 3.11.14 /opt/venv

# torch from the PyTorch CUDA 12.8 index, alone (no other index is consulted for it); the
# version is pyproject's pin (tests/test_deploy_files.py checks they agree). Its CUDA
# libraries (nvidia-*) and triton come with it, pinned by the torch wheel itself.
RUN uv pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0

# Everything else from PyPI at the pinned versions (scripts/lock_images.py).
COPY docker/requirements-worker.txt docker/build-constraints.txt /tmp/
RUN uv pip install --requirement /tmp/requirements-worker.txt

COPY pyproject.toml README.md ./
COPY crucible ./crucible
COPY service ./service
COPY worker ./worker
# --no-deps + check: a dependency missing from the pinned set fails the build; the last
# line proves torch is the CUDA build (no GPU is needed to ask).
RUN uv pip install --no-deps --build-constraint /tmp/build-constraints.txt . \
    && uv pip check \
    && /opt/venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is None)"


FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

LABEL org.opencontainers.image.title="crucible-worker" \
      org.opencontainers.image.description="Crucible Celery worker (torch CUDA build)"

# Same uid/gid as the api image: both write the shared data volume.
RUN groupadd --system --gid 10001 crucible \
    && useradd --system --uid 10001 --gid crucible --no-create-home \
       --home-dir /var/lib/crucible --shell /usr/sbin/nologin crucible \
    && install -d -o crucible -g crucible -m 0750 /var/lib/crucible /var/cache/huggingface

COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRUCIBLE_DATA_DIR=/var/lib/crucible \
    HF_HOME=/var/cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /var/lib/crucible

# The worker answers a broadcast ping from its main process even while a job runs.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.app:celery inspect ping --timeout 10 -d \"celery@$(hostname)\" >/dev/null"]

# One job at a time per container: one container per GPU (docs/operations.md).
CMD ["crucible", "worker", "--concurrency", "1"]
