"""The dashboard: static pages at / (index.html, app.js, style.css, a vendored uPlot).

Outside /v1 and outside OpenAPI: the files hold no data and need no key; every request the page
makes to /v1 sends the key the person gave it. FastAPI serves them as a frontend, checked only
after every API route, so no file can shadow an operation.
"""

from pathlib import Path

from fastapi import APIRouter

STATIC_DIRECTORY = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)
# No fallback: the pages route by the URL's #fragment, so an unknown path is the API's 404.
router.frontend("/", directory=STATIC_DIRECTORY, fallback=None, check_dir=True)
