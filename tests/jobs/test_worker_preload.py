"""A worker imports, before its pool forks, what each pool process's first job would import."""

import json
import subprocess
import sys

PROBE = """
import json, sys, threading
from worker.main import preload
heavy = ("sklearn.datasets", "mnist1d.data", "torch._dynamo")
before = [m for m in heavy if m in sys.modules]
preload()
print(json.dumps({
    "before": before,
    "after": [m for m in heavy if m in sys.modules],
    "threads": [t.name for t in threading.enumerate()],
}))
"""


def test_preload_imports_the_loaders_and_dynamo_and_starts_no_thread() -> None:
    # A fresh interpreter: this test process has imported everything long ago.
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] == []
    assert seen["after"] == ["sklearn.datasets", "mnist1d.data", "torch._dynamo"]
    # Forking a process that runs other threads can copy a lock some thread holds.
    assert seen["threads"] == ["MainThread"]
