"""The datasets API: uploads validated, stored and usable by a spec; bad files are named 422s."""

import io
import uuid
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.datasets import load_upload_arrays, resolve_dataset
from app.core.spec import JobSpec
from tests.factories import spec_payload
from worker.training.data import prepare
from worker.training.loop import TrainingRun

# Small limits, so that going over them costs a test nothing.
MAX_SAMPLES, MAX_FEATURES, MAX_BYTES, MAX_CLASSES = 400, 300, 64 * 1024, 20
MAX_UNPACKED = 256 * 1024


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=redis_url,
        max_upload_samples=MAX_SAMPLES,
        max_upload_features=MAX_FEATURES,
        max_upload_bytes=MAX_BYTES,
        max_upload_classes=MAX_CLASSES,
        max_upload_unpacked_bytes=MAX_UNPACKED,
    )


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def upload(client: TestClient, content: bytes, filename: str = "data.npz", **form: str) -> Response:
    return client.post("/v1/datasets", files={"file": (filename, content)}, data=form)


def tabular(n: int = 40, features: int = 3, classes: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, features)), "y": np.arange(n) % classes}


def test_npz_upload_is_stored_listed_and_trainable_by_name(
    client: TestClient, session: Session
) -> None:
    arrays = tabular(n=40, features=3, classes=3)
    response = upload(client, npz_bytes(**arrays), name="my table")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"].startswith("upload:")
    assert body | {"name": "", "created_at": None} == {
        "name": "",
        "source": "upload",
        "tenant": "default",  # the client's key's tenant
        "kind": "tabular",
        "input_shape": [3],
        "num_classes": 3,
        "n_samples": 40,
        "synthetic": False,
        "description": "my table",
        "class_names": None,
        "created_at": None,
    }
    listed = {item["name"]: item for item in client.get("/v1/datasets").json()["items"]}
    assert listed[body["name"]] == body
    assert listed["digits"]["source"] == "builtin"

    # Stored canonically: float32 features and int64 labels, the values unchanged.
    x, y = load_upload_arrays(session, uuid.UUID(body["name"].removeprefix("upload:")))
    assert (x.dtype, y.dtype) == (np.float32, np.int64)
    np.testing.assert_array_equal(x, arrays["x"].astype(np.float32))
    np.testing.assert_array_equal(y, arrays["y"])

    job = client.post(
        "/v1/jobs", json=spec_payload(dataset={"name": body["name"], "batch_size": 8})
    )
    assert job.status_code == 201, job.text
    cnn = spec_payload(dataset={"name": body["name"]}, model={"architecture": "cnn"})
    refused = client.post("/v1/jobs", json=cnn)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["field"] == "model.architecture"


def test_shape_and_kind_decide_image_sequence_or_tabular(client: TestClient) -> None:
    images = {"x": np.zeros((30, 6, 5)), "y": np.arange(30) % 2}
    body = upload(client, npz_bytes(**images)).json()
    assert (body["kind"], body["input_shape"]) == ("image", [6, 5])
    cnn = {"architecture": "cnn", "hidden_sizes": [4]}
    job = client.post("/v1/jobs", json=spec_payload(dataset={"name": body["name"]}, model=cnn))
    assert job.status_code == 201, job.text

    signals = upload(client, npz_bytes(**tabular(features=20)), kind="sequence").json()
    assert (signals["kind"], signals["input_shape"]) == ("sequence", [20])
    job = client.post("/v1/jobs", json=spec_payload(dataset={"name": signals["name"]}, model=cnn))
    assert job.status_code == 201, job.text


def test_csv_with_string_labels_maps_them_to_sorted_classes(
    client: TestClient, session: Session
) -> None:
    csv = "a,species,b\n1.5,setosa,2\n0,virginica,-1e3\n" + "3,versicolor,4\n" * 10
    response = upload(client, csv.encode(), "flowers.csv", label_column="species")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["class_names"] == ["setosa", "versicolor", "virginica"]
    assert (body["num_classes"], body["input_shape"], body["n_samples"]) == (3, [2], 12)
    x, y = load_upload_arrays(session, uuid.UUID(body["name"].removeprefix("upload:")))
    np.testing.assert_array_equal(x[:2], [[1.5, 2.0], [0.0, -1000.0]])
    assert y.tolist() == [0, 2] + [1] * 10


def test_csv_integer_labels_are_class_indices(client: TestClient) -> None:
    csv = "label,f1\n" + "".join(f"{i % 4},{i}\n" for i in range(20))
    body = upload(client, csv.encode(), "t.csv").json()
    assert (body["num_classes"], body["class_names"], body["input_shape"]) == (4, None, [1])


def _pickled_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}] * 12, dtype=object), y=np.arange(12) % 2)
    return buffer.getvalue()


BAD_NPZ: dict[str, tuple[dict[str, Any] | bytes, str, str]] = {
    "nan": ({"x": np.full((20, 2), np.nan), "y": np.arange(20) % 2}, "file.x", "NaN"),
    "inf": ({"x": np.full((20, 2), np.inf), "y": np.arange(20) % 2}, "file.x", "infinite"),
    "float64 beyond float32": (
        {"x": np.full((20, 2), 1e300), "y": np.arange(20) % 2},
        "file.x",
        "infinite",
    ),
    "pickled objects": (_pickled_npz(), "file", "pickle"),
    "not a zip": (b"PK\x03\x04 definitely not a zip", "file", "npz"),
    "no y": ({"x": np.zeros((20, 2))}, "file", "no array named y"),
    "string x": ({"x": np.array([["a"]] * 20), "y": np.arange(20) % 2}, "file.x", "numeric"),
    "lengths differ": ({"x": np.zeros((20, 2)), "y": np.arange(19) % 2}, "file.y", "19 labels"),
    "float labels": ({"x": np.zeros((20, 2)), "y": np.arange(20) / 2}, "file.y", "integers"),
    "negative labels": ({"x": np.zeros((20, 2)), "y": np.arange(20) - 1}, "file.y", "0..C-1"),
    "one class": ({"x": np.zeros((20, 2)), "y": np.zeros(20, int)}, "file.y", "two classes"),
    "2-D labels": ({"x": np.zeros((20, 2)), "y": np.zeros((20, 2), int)}, "file.y", "shape"),
    "4-D x": ({"x": np.zeros((20, 2, 2, 2)), "y": np.arange(20) % 2}, "file.x", "height"),
    "no features": ({"x": np.zeros((20, 0)), "y": np.arange(20) % 2}, "file.x", "no features"),
    "too few samples": ({"x": np.zeros((5, 2)), "y": np.arange(5) % 2}, "file.x", "at least"),
    "too many samples": (
        {"x": np.zeros((MAX_SAMPLES + 1, 1)), "y": np.arange(MAX_SAMPLES + 1) % 2},
        "file.x",
        "limit of 400",
    ),
    "too many features": (
        {"x": np.zeros((20, 20, 16)), "y": np.arange(20) % 2},
        "file.x",
        "limit of 300",
    ),
    "too many classes": (
        {"x": np.zeros((20, 2)), "y": np.arange(20) * 50},
        "file.y",
        "limit of 20",
    ),
}


@pytest.mark.parametrize("case", BAD_NPZ, ids=list(BAD_NPZ))
def test_bad_npz_is_422_naming_field_and_reason(client: TestClient, case: str) -> None:
    arrays, field, reason = BAD_NPZ[case]
    content = arrays if isinstance(arrays, bytes) else npz_bytes(**arrays)
    response = upload(client, content)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == field
    assert reason in error["message"]


BAD_CSV: dict[str, tuple[bytes, dict[str, str], str, str]] = {
    "no label column": (b"a,b\n1,2\n", {}, "label_column", "no column 'label'"),
    "text feature": (b"label,a\n0,1\n1,one\n", {}, "file", "line 3"),
    "ragged row": (b"label,a\n0,1\n1,2,3\n", {}, "file", "line 3 has 3 fields"),
    "empty": (b"\n\n", {}, "file", "empty"),
    "not utf-8": (b"label,a\n0,\xff\n", {}, "file", "UTF-8"),
    "nan feature": (b"label,a\n" + b"0,nan\n1,2\n" * 6, {}, "file.x", "NaN"),
    "image kind": (b"label,a\n" + b"0,1\n1,2\n" * 6, {"kind": "image"}, "kind", "height"),
    "unknown kind": (b"label,a\n0,1\n", {"kind": "video"}, "kind", "Input should be"),
}


@pytest.mark.parametrize("case", BAD_CSV, ids=list(BAD_CSV))
def test_bad_csv_is_422_naming_field_and_reason(client: TestClient, case: str) -> None:
    content, form, field, reason = BAD_CSV[case]
    response = upload(client, content, "t.csv", **form)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == field
    assert reason in error["message"]


def test_upload_over_byte_limit_is_413(client: TestClient) -> None:
    response = upload(client, b"label,a\n" + b"0,1\n" * (MAX_BYTES // 4))
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_uploaded_sequence_trains_a_1d_cnn(client: TestClient, session: Session) -> None:
    """The worker's side: what the API stored loads, prepares and trains as the spec says."""
    rng = np.random.default_rng(1)
    y = np.arange(60) % 2
    x = rng.normal(size=(60, 16)) + y[:, None]  # separable: the class shifts every position
    body = upload(client, npz_bytes(x=x, y=y), kind="sequence").json()
    payload = spec_payload(
        dataset={"name": body["name"], "batch_size": 16},
        model={
            "architecture": "cnn",
            "hidden_sizes": [4],
            "dropout": {"type": "spatial", "rate": 0.1},
        },
        epochs=2,
    )
    spec = JobSpec.model_validate(payload)
    info = resolve_dataset(session, body["name"])
    assert (info.kind, info.input_shape) == ("sequence", (16,))
    arrays = load_upload_arrays(session, uuid.UUID(body["name"].removeprefix("upload:")))
    run = TrainingRun(spec, prepare(spec.dataset, info, arrays))
    results = list(run.epochs(lambda: False))
    assert [result.epoch for result in results] == [1, 2]
    assert all(np.isfinite(result.metrics["val_loss"]) for result in results)


def test_npz_that_unpacks_past_the_limit_is_422_before_it_is_read(client: TestClient) -> None:
    # A zip bomb in miniature: 2 MiB of zeros compress to a few kilobytes, well under the
    # body limit, and would unpack to eight times the unpacked limit.
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((2, 128 * 1024), dtype=np.float64), y=np.array([0, 1]))
    assert len(buffer.getvalue()) < MAX_BYTES
    response = upload(client, buffer.getvalue())
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "file.x"
    assert "unpacks to 2097280 bytes" in error["message"]
