"""The datasets API: uploads validated, stored and usable by a spec; bad files are named 422s."""

import io
import uuid
import warnings
import zipfile
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy.orm import Session

from app.api.datasets import parsing
from app.core.config import Settings
from app.core.datasets import load_upload_arrays, resolve_dataset
from app.core.errors import InvalidInput
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
        upload_concurrency=1,
        upload_wait_seconds=0.2,
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
        "display_name": "my table",
        "source": "upload",
        "tenant": "default",  # the client's key's tenant
        "kind": "tabular",
        "input_shape": [3],
        "num_classes": 3,
        "n_samples": 40,
        "synthetic": False,
        "description": "uploaded .npz file",
        "class_names": None,
        "created_at": None,
    }
    listed = {item["name"]: item for item in client.get("/v1/datasets").json()["items"]}
    assert listed[body["name"]] == body
    assert listed["digits"]["source"] == "builtin"
    assert listed["digits"]["display_name"] is None

    # The display name is a label only: a spec names the upload by upload:<id>.
    by_label = client.post("/v1/jobs", json=spec_payload(dataset={"name": "my table"}))
    assert by_label.status_code == 422
    assert by_label.json()["detail"][0]["field"] == "dataset.name"

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
    "label column twice": (b"label,a,label\n0,1,0\n", {}, "label_column", "'label' 2 times"),
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


# -- crafted inputs that were 500s ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "upload:" + "-" * 36,  # passed the old regex, then uuid.UUID raised
        f"upload:{uuid.uuid4()}\n",  # `$` matched before the trailing newline
        f"upload:{uuid.uuid4().hex}xxxx",  # 36 hex-ish characters, not a UUID's layout
    ],
    ids=["dashes", "trailing newline", "no dashes"],
)
def test_malformed_upload_name_in_spec_is_422(client: TestClient, name: str) -> None:
    response = client.post("/v1/jobs", json=spec_payload(dataset={"name": name}))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == "dataset.name"
    assert "unknown dataset" in error["message"]


def test_upload_name_of_unknown_id_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", json=spec_payload(dataset={"name": f"upload:{uuid.uuid4()}"})
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "dataset.name"


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header_only(descr: str, shape: tuple[int, ...]) -> bytes:
    """An .npy whose header claims `shape` but which holds no data at all."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def test_npz_members_without_npy_suffix_are_422(client: TestClient) -> None:
    arrays = tabular()
    content = zip_bytes({"x": npy_bytes(arrays["x"]), "y": npy_bytes(arrays["y"])})
    response = upload(client, content)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == "file"
    assert "x.npy" in error["message"]


def test_npz_header_claiming_a_huge_shape_is_422_before_any_allocation(
    client: TestClient,
) -> None:
    # 674 bytes that once made numpy allocate 74.5 GiB: the header is judged, not trusted.
    content = zip_bytes(
        {"x.npy": npy_header_only("<f8", (10**10,)), "y.npy": npy_bytes(np.arange(20) % 2)}
    )
    assert len(content) < 1000
    response = upload(client, content)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == "file.x"
    assert "10000000000" in error["message"]


def test_npz_header_claiming_more_data_than_it_holds_is_422(client: TestClient) -> None:
    # Within every limit, but the member holds no data: a truncated file, not a 500.
    content = zip_bytes(
        {"x.npy": npy_header_only("<f4", (20, 3)), "y.npy": npy_bytes(np.arange(20) % 2)}
    )
    response = upload(client, content)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == "file.x"
    assert "truncated" in error["message"]


def test_npz_members_together_over_the_unpacked_limit_are_422(client: TestClient) -> None:
    # Each member under the limit, both together over it: the limit is per upload.
    x = np.zeros((MAX_SAMPLES, 40))  # 128,000 bytes
    y = np.array([f"class {i % 2}".ljust(100) for i in range(MAX_SAMPLES)])  # 160,000 bytes
    assert x.nbytes < MAX_UNPACKED
    assert y.nbytes < MAX_UNPACKED < x.nbytes + y.nbytes
    content = io.BytesIO()
    np.savez_compressed(content, x=x, y=y)
    response = upload(client, content.getvalue())
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == "file"
    assert "together" in error["message"]


def test_csv_label_that_isdigit_but_is_no_integer_is_a_string_label(client: TestClient) -> None:
    # "²".isdigit() is True and int("²") raises: such labels are names, like any other text.
    csv = "label,a\n" + "".join(f"{'²' if i % 2 else '1'},{i}\n" for i in range(20))
    response = upload(client, csv.encode(), "t.csv")
    assert response.status_code == 201, response.text
    assert response.json()["class_names"] == ["1", "²"]


def test_csv_label_too_long_is_422(client: TestClient) -> None:
    # 5,000 digits is past Python's int-string limit: a clear 422, not a ValueError's 500.
    csv = "label,a\n" + "0,1\n" * 10 + "9" * 5000 + ",2\n"
    response = upload(client, csv.encode(), "t.csv")
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == "file.y"
    assert "longer than" in error["message"]


def test_upload_beyond_the_concurrency_waits_then_is_429(client: TestClient) -> None:
    content = npz_bytes(**tabular())
    assert upload(client, content).status_code == 201
    slots = client.app.state.upload_slots  # type: ignore[attr-defined]
    with slots.slot():  # the one slot (upload_concurrency=1) is taken while this one arrives
        busy = upload(client, content)
    assert busy.status_code == 429, busy.text
    assert busy.json()["error"] == "uploads_busy"
    assert "TRAINSVC_UPLOAD_CONCURRENCY" in busy.json()["detail"]
    assert busy.headers["retry-after"] == "5"
    assert upload(client, content).status_code == 201  # the slot was given back


@pytest.mark.parametrize(
    ("dataset", "field"),
    [
        ({"val_fraction": 0.99}, "dataset.val_fraction"),  # 10 samples: 10 val, 0 train
        ({"val_fraction": 0.9}, "dataset.val_fraction"),  # 9 val, 1 train (batch_norm needs 2)
        ({"val_fraction": 0.5, "train_subset": 1}, "dataset.train_subset"),
    ],
    ids=["nothing to train on", "one to train on", "subset of one"],
)
def test_split_the_worker_cannot_train_on_is_422_at_submit(
    client: TestClient, dataset: dict[str, Any], field: str
) -> None:
    # Accepted before, then failed in the worker with "range() arg 3 must not be zero".
    body = upload(client, npz_bytes(**tabular(n=10))).json()
    response = client.post("/v1/jobs", json=spec_payload(dataset={"name": body["name"], **dataset}))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == field
    fine = spec_payload(dataset={"name": body["name"], "val_fraction": 0.8})  # 8 val, 2 train
    assert client.post("/v1/jobs", json=fine).status_code == 201


def test_split_of_a_synthetic_set_is_judged_on_its_n_samples(client: TestClient) -> None:
    dataset = {"name": "two_moons", "n_samples": 20, "val_fraction": 0.95}
    response = client.post("/v1/jobs", json=spec_payload(dataset=dataset))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "dataset.val_fraction"
    assert "20 samples" in response.json()["detail"][0]["message"]


def test_gradient_noise_micro_batches_that_do_not_fit_twice_in_training_are_422(
    client: TestClient,
) -> None:
    """Accepted before, the noise probe then measured nothing in any epoch (it needs two
    micro-batches of the training split), and the job looked probed."""
    dataset = {"name": "two_moons", "n_samples": 20, "val_fraction": 0.5}  # 10 to train on
    for size, status in ((6, 422), (5, 201)):
        diagnostics = {"gradient_noise": {"micro_batch_size": size}}
        response = client.post(
            "/v1/jobs", json=spec_payload(dataset=dataset, diagnostics=diagnostics)
        )
        assert response.status_code == status, response.text
    [error] = client.post(
        "/v1/jobs",
        json=spec_payload(dataset=dataset, diagnostics={"gradient_noise": {"micro_batch_size": 8}}),
    ).json()["detail"]
    assert error["field"] == "diagnostics.gradient_noise.micro_batch_size"
    assert "at most 5" in error["message"]


def test_display_name_defaults_to_the_file_name_and_refuses_nul(client: TestClient) -> None:
    content = npz_bytes(**tabular())
    assert upload(client, content, "churn.npz").json()["display_name"] == "churn.npz"
    response = upload(client, content, name="a\x00b")  # PostgreSQL cannot store a NUL
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "name"


def test_npz_with_a_huge_zip_directory_is_422_before_zipfile_reads_it(client: TestClient) -> None:
    # zipfile makes an object per directory entry up front: a 64 MiB upload of empty members
    # would be over a million of them, before a single header is read.
    arrays = tabular()
    members = {"x.npy": npy_bytes(arrays["x"]), "y.npy": npy_bytes(arrays["y"])}
    members |= {f"pad{i}": b"" for i in range(600)}
    response = upload(client, zip_bytes(members))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == "file"
    assert "602 members" in error["message"]


def test_csv_line_longer_than_the_limit_is_422_before_it_is_split() -> None:
    limits = parsing.UploadLimits(
        max_samples=100, max_features=1, max_unpacked_bytes=1024**2, max_classes=10
    )
    line = b"0," * (limits.max_csv_line_bytes // 2 + 1)
    with pytest.raises(InvalidInput, match="longer than"):
        parsing.read_csv(io.BytesIO(b"label,a\n" + line + b"\n"), "label", limits)


def test_npz_with_two_members_of_one_name_is_422(client: TestClient) -> None:
    # zipfile reads the last x.npy, unzip and other readers the first: refused, not guessed.
    arrays = tabular()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate it is told to write
        archive.writestr("x.npy", npy_bytes(arrays["x"]))
        archive.writestr("y.npy", npy_bytes(arrays["y"]))
        archive.writestr("x.npy", npy_bytes(-arrays["x"]))
    response = upload(client, buffer.getvalue())
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error == {"field": "file.x", "message": "the .npz has 2 members named x.npy"}
    items = client.get("/v1/datasets").json()["items"]
    assert all(item["source"] == "builtin" for item in items)  # nothing stored


@pytest.mark.parametrize(
    ("second_file", "form", "field", "message"),
    [
        (True, {}, "file", "sent 2 times; it takes one value"),
        (False, {"kind": ["image", "tabular"]}, "kind", "sent 2 times; it takes one value"),
        (False, {"knd": "image"}, "knd", "no such form field; it takes: file, kind"),
    ],
    ids=["two-files", "kind-twice", "unknown-field"],
)
def test_a_form_field_repeated_or_undeclared_is_422_and_nothing_is_stored(
    client: TestClient, second_file: bool, form: dict[str, Any], field: str, message: str
) -> None:
    # FastAPI kept the last file and the last kind and ignored "knd": the upload stored was
    # not the one sent, and nothing said so.
    files = [("file", ("a.npz", npz_bytes(**tabular())))]
    if second_file:
        files.append(("file", ("b.npz", npz_bytes(**tabular(features=5)))))
    response = client.post("/v1/datasets", files=files, data=form)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == field
    assert message in error["message"]
    items = client.get("/v1/datasets").json()["items"]
    assert all(item["source"] == "builtin" for item in items)  # nothing stored
