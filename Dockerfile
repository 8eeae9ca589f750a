# Two images from one file: `api` (FastAPI; no torch) and `worker` (Celery + PyTorch, CUDA-capable).
# docker-compose.yml builds both; `docker build --target api .` builds one.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/trainsvc
RUN useradd --create-home --uid 10001 trainsvc
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml constraints.txt README.md ./
COPY app/__init__.py app/__init__.py
COPY worker/__init__.py worker/__init__.py

FROM base AS api
RUN pip install -c constraints.txt -e .
COPY alembic.ini ./
COPY migrations migrations
COPY app app
COPY worker worker
USER trainsvc
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/health')"
CMD ["trainsvc", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# PyPI's torch 2.13.0 for Linux carries its CUDA runtime (the nvidia-* wheels): this image trains
# on the GPUs the NVIDIA container toolkit exposes, one process per GPU, and on the CPU without.
RUN pip install -c constraints.txt -e ".[worker]"
COPY alembic.ini ./
COPY migrations migrations
COPY app app
COPY worker worker
USER trainsvc
# SIGTERM makes the worker hand its running jobs back to the queue (docs/reliability.md).
STOPSIGNAL SIGTERM
CMD ["trainsvc", "worker"]
