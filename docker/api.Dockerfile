# syntax=docker/dockerfile:1
# The API image: FastAPI + uvicorn with pyproject's base dependencies only. No torch: the API
# sends tasks by name and never imports the merge engine (docs/architecture.md).
#
#   docker build -f docker/api.Dockerfile -t crucible-api .
#
# Two stages: the builder makes a virtual environment from the pinned set
# (docker/requirements-api.txt, written by scripts/lock_images.py) plus the crucible wheel;
# the runtime stage copies that environment alone onto a clean slim image.

FROM python:3.11.14-slim-bookworm AS builder

# uv (one static binary) installs the pinned set; its image tag pins its version.
COPY --from=ghcr.io/astral-sh/uv:0.9.24 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    VIRTUAL_ENV=/opt/venv

WORKDIR /src
RUN uv venv --python /usr/local/bin/python3.11 /opt/venv

# Dependencies before the code, so a code change reuses this layer.
COPY docker/requirements-api.txt docker/build-constraints.txt /tmp/
RUN uv pip install --requirement /tmp/requirements-api.txt

COPY pyproject.toml README.md ./
COPY crucible ./crucible
COPY service ./service
COPY worker ./worker
# --no-deps + check: a dependency missing from the pinned set fails the build instead of
# being fetched unpinned. The last line proves the environment holds no torch.
RUN uv pip install --no-deps --build-constraint /tmp/build-constraints.txt . \
    && uv pip check \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"


FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="crucible-api" \
      org.opencontainers.image.description="Crucible HTTP API (no torch)"

# The same fixed uid/gid in the api and worker images: both write the shared data volume.
RUN groupadd --system --gid 10001 crucible \
    && useradd --system --uid 10001 --gid crucible --no-create-home \
       --home-dir /var/lib/crucible --shell /usr/sbin/nologin crucible \
    && install -d -o crucible -g crucible -m 0750 /var/lib/crucible

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRUCIBLE_DATA_DIR=/var/lib/crucible

USER 10001:10001
WORKDIR /var/lib/crucible
EXPOSE 8000

# /healthz answers while the process serves requests (service/routes/meta.py); /readyz
# also needs the database and broker, which compose checks through depends_on instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["crucible", "serve", "--host", "0.0.0.0", "--port", "8000"]
