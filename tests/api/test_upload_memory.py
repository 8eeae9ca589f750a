"""The API's memory under a 50 MiB upload, measured in a real server process over real HTTP.

README ("Uploads and memory") promises that parsing one upload holds about 3 x its features
as float32 (the array, its compressed copy, the database driver's copy), the upload itself
staying in a spooled file on disk; a refused upload holds next to nothing. Before, a 16 MiB
CSV peaked at 135 MiB and a 60 MB CSV at 1.86 GB.
"""

import io
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.core.migrate import upgrade
from tests.support.processes import Processes

MiB = 1024 * 1024
UPLOAD_BYTES = 50 * MiB
FEATURES = 32


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns that RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_kib(pid, "VmRSS") * 1024


def peak_growth(pid: int, baseline: int) -> int:
    return rss_kib(pid, "VmHWM") * 1024 - baseline


def write_csv(path: Path, size: int) -> int:
    """A CSV of about `size` bytes: a label column and FEATURES numbers a row; returns its rows."""
    rng = np.random.default_rng(0)
    rows, written = 0, 0
    with path.open("w") as out:
        out.write("label," + ",".join(f"f{i}" for i in range(FEATURES)) + "\n")
        while written < size:
            block = rng.random((5000, FEATURES))
            lines = "".join(
                f"{(rows + i) % 2}," + ",".join(f"{v:.6f}" for v in row) + "\n"
                for i, row in enumerate(block)
            )
            out.write(lines)
            written += len(lines)
            rows += len(block)
    return rows


def write_bomb(path: Path, size: int) -> None:
    """An .npz of `size` bytes whose x header claims 10^10 float64s (74.5 GiB)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**10,)}
    )
    y = io.BytesIO()
    np.save(y, np.arange(20) % 2)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * size)
        archive.writestr("y.npy", y.getvalue())


@pytest.mark.e2e
def test_a_50_mib_upload_grows_the_api_by_a_small_multiple_of_its_float32_size(
    processes: Processes, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
    upgrade(database_url)
    processes.env.update(
        {
            "TRAINSVC_DATABASE_URL": database_url,
            "TRAINSVC_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        }
    )
    url = processes.api()
    pid = processes.started[-1][0].pid
    csv_path, bomb_path = tmp_path / "big.csv", tmp_path / "bomb.npz"
    rows = write_csv(csv_path, UPLOAD_BYTES)
    write_bomb(bomb_path, UPLOAD_BYTES)
    with httpx.Client(base_url=url, timeout=120) as http:
        # Warm up: the first upload imports and allocates what every later one reuses.
        warm = http.post(
            "/v1/datasets",
            files={"file": ("w.csv", b"label,a\n" + b"0,1\n1,2\n" * 10)},
        )
        assert warm.status_code == 201, warm.text

        baseline = reset_peak(pid)
        with bomb_path.open("rb") as bomb:
            refused = http.post("/v1/datasets", files={"file": ("bomb.npz", bomb)})
        assert refused.status_code == 422, refused.text
        refused_growth = peak_growth(pid, baseline)

        baseline = reset_peak(pid)
        with csv_path.open("rb") as csv:
            accepted = http.post("/v1/datasets", files={"file": ("big.csv", csv)})
        assert accepted.status_code == 201, accepted.text
        accepted_growth = peak_growth(pid, baseline)

    float32_bytes = rows * FEATURES * 4
    assert accepted.json()["n_samples"] == rows
    print(
        f"50 MiB CSV ({rows} rows, x as float32 {float32_bytes / MiB:.1f} MiB): peak RSS "
        f"+{accepted_growth / MiB:.1f} MiB; 50 MiB .npz bomb: +{refused_growth / MiB:.1f} MiB"
    )
    assert accepted_growth < 3 * float32_bytes + 16 * MiB
    assert refused_growth < 16 * MiB
