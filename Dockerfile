# Two images from one file: `api` (FastAPI; no torch) and `worker` (Celery + PyTorch, CUDA-capable).
# Both install the same built wheel (not an editable checkout): what runs is what was packaged,
# migrations included. docker-compose.yml builds both; `docker build --target api .` builds one.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/trainsvc
# The working folder is the service user's: `trainsvc up` (or a serve without compose's
# PostgreSQL) writes its SQLite files here.
RUN useradd --create-home --uid 10001 trainsvc && chown trainsvc:trainsvc /srv/trainsvc
# The dependency lists alone, read from pyproject.toml: installed before the code is copied, so
# a code change does not reinstall them.
COPY pyproject.toml constraints.txt ./
# trainsvc-client is left out: it is not on PyPI but built beside trainsvc (stage `build`).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = [d for d in p['dependencies'] if not d.startswith('trainsvc-client')]; \
worker = p['optional-dependencies']['worker']; \
open('requirements-api.txt', 'w').write('\n'.join(deps)); \
open('requirements-worker.txt', 'w').write('\n'.join(deps + worker))"

FROM base AS build
COPY README.md ./
COPY app app
COPY worker worker
COPY migrations migrations
COPY client client
RUN pip wheel --no-deps --wheel-dir /wheels . ./client

FROM base AS api
RUN pip install -c constraints.txt -r requirements-api.txt
COPY --from=build /wheels /wheels
RUN pip install -c constraints.txt --find-links /wheels /wheels/trainsvc-0*.whl && rm -rf /wheels
USER trainsvc
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/health')"
CMD ["trainsvc", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# PyPI's torch for Linux carries its CUDA runtime (the nvidia-* wheels): this image trains on the
# GPUs the NVIDIA container toolkit exposes, one process per GPU, and on the CPU without.
RUN pip install -c constraints.txt -r requirements-worker.txt
COPY --from=build /wheels /wheels
RUN pip install -c constraints.txt --find-links /wheels /wheels/trainsvc-0*.whl && rm -rf /wheels
USER trainsvc
# SIGTERM makes the worker hand its running jobs back to the queue (docs/reliability.md).
STOPSIGNAL SIGTERM
CMD ["trainsvc", "worker"]
