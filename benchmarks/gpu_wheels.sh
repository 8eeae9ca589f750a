#!/usr/bin/env bash
# Run HERE (a machine with the package registry), before a session's GPU checks: downloads into
# .whl/ the wheels that the lent GPU machine's image lacks (it has Python 3.12, PyTorch, numpy,
# scikit-learn, httpx, pytest, safetensors...; no FastAPI, SQLAlchemy, Celery, pydantic), at the
# versions constraints.txt pins. The GPU machine reaches no registry: `run` carries .whl there,
# and benchmarks/gpu_checks.sh installs it. About 16 MiB, under the 64 MiB a call carries.
# The list was checked on a CPU machine: in a Python 3.11 venv holding only what the image
# lists that trainsvc uses (torch, numpy, scipy, scikit-learn, matplotlib, pytest with
# pytest-timeout and pytest-xdist, hypothesis, httpx, safetensors, prometheus-client, requests,
# tqdm, click, pyyaml) plus these wheels for 3.11, every step of gpu_checks.sh ran.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # .whl/ must travel, never be committed
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
missing=(
    alembic amqp annotated-types billiard celery click-didyoumean click-plugins click-repl
    fastapi greenlet kombu Mako mnist1d orjson prompt_toolkit psycopg psycopg-binary pydantic
    pydantic_core pydantic-settings python-dotenv python-multipart redis SQLAlchemy starlette
    tenacity typing-inspection tzlocal uvicorn vine wcwidth
    # There, but perhaps older than pydantic, SQLAlchemy and Starlette need:
    typing_extensions anyio annotated-doc
    # What FastAPI needs that the image lacks:
    opentelemetry-api
)
pins=()
for name in "${missing[@]}"; do
    pin=$(grep -i "^${name}==" constraints.txt) || { echo "not in constraints.txt: $name" >&2; exit 1; }
    pins+=("$pin")
done
# PYTHON_VERSION=3.11 WHEELS=/tmp/w: the same list for this machine, to check it here first.
python_version=${PYTHON_VERSION:-3.12}
wheels=${WHEELS:-.whl}
rm -rf "$wheels" && mkdir -p "$wheels"
platforms=()
for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$wheels" "${pins[@]}"
du -sh "$wheels"
