"""One metrics directory for a group of processes (prometheus-client's multiprocess mode).

prometheus-client picks its mode when it is first imported, from PROMETHEUS_MULTIPROC_DIR, so
this must run before anything imports it: this module deliberately does not.
"""

import atexit
import os
import shutil
import sys
import tempfile


def share_metrics_between_processes() -> str:
    """Point this process and its children at one metrics directory; returns it.

    An operator's PROMETHEUS_MULTIPROC_DIR wins (they empty it before each start, as the
    prometheus-client documentation asks); otherwise a fresh temporary directory, removed on exit.
    """
    existing = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if existing:
        return existing
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory")
    directory = tempfile.mkdtemp(prefix="trainsvc-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory
