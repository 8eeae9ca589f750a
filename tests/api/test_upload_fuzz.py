"""Property-based uploads: whatever bytes arrive as a CSV or an .npz, the answer is a 201 or a
clear 4xx with the {"error", "detail"} body, never a 500.

The strategies build files that are nearly right (real CSV tables and real .npz archives with
odd dtypes, shapes, labels and headers) and then break them (flipped bytes, truncation,
garbage), since nearly right is where parsers fail.
"""

import io
import zipfile
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.core.config import Settings

MAX_BYTES = 64 * 1024

FUZZ = hypothesis_settings(
    max_examples=60,
    deadline=None,
    # The client is set up once per test; each example posts a fresh upload to it.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=redis_url,
        max_upload_samples=200,
        max_upload_features=50,
        max_upload_bytes=MAX_BYTES,
        max_upload_classes=20,
        max_upload_unpacked_bytes=32 * 1024,
    )


def assert_clear_answer(response: Any) -> None:
    event(f"status {response.status_code}")  # --hypothesis-show-statistics: the mix
    assert response.status_code == 201 or 400 <= response.status_code < 500, response.text
    if response.status_code != 201:
        body = response.json()
        assert set(body) == {"error", "detail"}, body
        assert body["error"], body


# -- CSV ---------------------------------------------------------------------------------------

numbers = st.one_of(
    *[st.integers(0, 3).map(str)] * 3,
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
)
cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 25).map(str),
    st.sampled_from(
        ["", " ", "²", "٣", "-", "--1", "1e999", "0x10", "1_0", '"', '"a,b"', "9" * 300]
    ),
    st.text(max_size=8),
)


@st.composite
def csv_tables(draw: st.DrawFn) -> bytes:
    columns = draw(st.integers(1, 6))
    header = ["label"] + [f"f{i}" for i in range(columns - 1)]
    header = draw(st.permutations(header))
    # Half the tables are clean numbers (most then upload), half draw from every odd cell.
    clean = draw(st.booleans())
    cell = numbers if clean else cells
    rows = [header]
    for _ in range(draw(st.integers(0, 30))):
        width = columns + (0 if clean else draw(st.sampled_from([0, 0, 0, 0, -1, 1])))
        rows.append([draw(cell) for _ in range(max(width, 0))])
    text = "\n".join(",".join(row) for row in rows)
    return text.encode("utf-8")


def corrupted(data: bytes, draw: st.DrawFn) -> bytes:
    """The bytes as they are, truncated, or with a slice replaced by garbage."""
    how = draw(st.sampled_from(["as is", "as is", "truncate", "overwrite", "append"]))
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "overwrite" and data:
        start = draw(st.integers(0, len(data) - 1))
        garbage = draw(st.binary(min_size=1, max_size=16))
        return data[:start] + garbage + data[start + len(garbage) :]
    if how == "append":
        return data + draw(st.binary(max_size=64))
    return data


@st.composite
def csv_uploads(draw: st.DrawFn) -> bytes:
    return corrupted(draw(st.one_of(csv_tables(), st.binary(max_size=512))), draw)


# -- .npz --------------------------------------------------------------------------------------

x_dtypes = st.sampled_from(["<f8", "<f4", ">f8", "<i8", "|u1", "|b1", "<f2", "<U3", "<c8"])
y_dtypes = st.sampled_from(["<i8", "<u8", "|i1", "|b1", "<f4", "<U4", "|S4"])


@st.composite
def npz_archives(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 40))
    x_shape = draw(st.sampled_from([(n,), (n, 3), (n, 2, 2), (n, 0), (n, 1, 1, 1)]))
    x = draw(hnp.arrays(draw(x_dtypes), x_shape))
    y_len = draw(st.sampled_from([n, n, n, max(n - 1, 0)]))
    y = draw(hnp.arrays(draw(y_dtypes), (y_len,)))
    if draw(st.booleans()):
        x = np.asfortranarray(x)
    members: dict[str, bytes] = {}
    for name, array in (("x", x), ("y", y)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        members[draw(st.sampled_from([f"{name}.npy", f"{name}.npy", name]))] = buffer.getvalue()
    if draw(st.booleans()):
        # A header that claims a shape of its own, with or without the data behind it.
        claimed = draw(st.lists(st.integers(-1, 10**12), min_size=0, max_size=3))
        buffer = io.BytesIO()
        header = {
            "descr": draw(x_dtypes),
            "fortran_order": draw(st.booleans()),
            "shape": tuple(claimed),
        }
        np.lib.format.write_array_header_1_0(buffer, header)
        members["x.npy"] = buffer.getvalue() + draw(st.binary(max_size=64))
    archive = io.BytesIO()
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(archive, "w", compression=compression) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return corrupted(archive.getvalue(), draw)


# -- the properties ----------------------------------------------------------------------------


@FUZZ
@given(content=csv_uploads(), label_column=st.sampled_from(["label", "f0", "missing"]))
def test_any_csv_upload_is_201_or_a_clear_4xx(
    client: TestClient, content: bytes, label_column: str
) -> None:
    response = client.post(
        "/v1/datasets",
        files={"file": ("data.csv", content)},
        data={"label_column": label_column},
    )
    assert_clear_answer(response)


@FUZZ
@given(content=npz_archives(), kind=st.sampled_from([None, "tabular", "sequence", "image"]))
def test_any_npz_upload_is_201_or_a_clear_4xx(
    client: TestClient, content: bytes, kind: str | None
) -> None:
    form = {} if kind is None else {"kind": kind}
    response = client.post("/v1/datasets", files={"file": ("data.npz", content)}, data=form)
    assert_clear_answer(response)
