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


def directory_refusal() -> str | None:
    """Why an operator's PROMETHEUS_MULTIPROC_DIR cannot be used, or None. prometheus-client
    opens a file there for each metric as its module is imported: a directory that was not
    made, or that this user cannot write, ended serve and worker in its traceback."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return None
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        return (
            f"PROMETHEUS_MULTIPROC_DIR={directory} is not a directory this user can write: "
            "create it (empty) before the processes start, or unset it"
        )
    return None
