"""The jobs API against real PostgreSQL and SQLite (each test rolled back)."""

import json
import os
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.api.errors import ErrorResponse
from app.api.jobs import service
from app.api.jobs.service import spec_sha256
from app.core.models import Checkpoint, Job
from app.core.spec import JobSpec
from tests.factories import make_checkpoint, make_job, spec_payload, with_lone_surrogate


def test_submit_stores_normalized_spec_with_defaults(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={"dataset": {"name": "digits"}, "epochs": 2})
    assert response.status_code == 201
    job = response.json()
    assert job["status"] == "queued"
    assert job["progress"] == {"epoch": 0, "epochs": 2}
    assert job["spec"]["model"]["hidden_sizes"] == [128, 64]
    assert job["spec"]["optimizer"]["type"] == "adam"
    assert job["spec"]["dataset"]["val_fraction"] == 0.2
    assert job["error"] is None
    assert job["summary"] is None
    assert client.get(f"/v1/jobs/{job['id']}").json()["spec"] == job["spec"]


def test_submit_publishes_after_commit(client: TestClient, session: Session) -> None:
    job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]
    row = session.get(Job, uuid.UUID(job_id))
    assert row is not None
    assert row.published_at is not None


def test_unknown_field_is_422_naming_it(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", json=spec_payload(dataset={"name": "digits", "colour": "red"})
    )
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "validation_error"
    assert {"field": "dataset.colour", "message": "Extra inputs are not permitted"} in body[
        "detail"
    ]


def test_bad_enum_and_missing_required_fields_are_named(client: TestClient) -> None:
    payload = spec_payload(model={"normalization": {"type": "magic_norm"}})
    del payload["epochs"]
    response = client.post("/v1/jobs", json=payload)
    assert response.status_code == 422
    fields = {item["field"] for item in response.json()["detail"]}
    assert fields == {"model.normalization.type", "epochs"}


def test_impossible_combination_is_422_with_reason(client: TestClient) -> None:
    payload = spec_payload(
        model={"hidden_sizes": [30], "normalization": {"type": "group_norm", "num_groups": 8}}
    )
    response = client.post("/v1/jobs", json=payload)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "model.normalization.num_groups"
    assert "divisible" in error["message"]


def test_batch_norm_in_an_mlp_on_batches_of_one_is_422_before_it_is_trained(
    client: TestClient,
) -> None:
    """It passed, and failed in the worker ("Expected more than 1 value per channel")."""
    norm = {"type": "batch_norm"}
    dataset = {"name": "iris", "batch_size": 1}
    payload = spec_payload(dataset=dataset, model={"hidden_sizes": [8], "normalization": norm})
    response = client.post("/v1/jobs", json=payload)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "dataset.batch_size"
    assert "at least 2 samples" in error["message"]
    # A cnn's batch norm also averages over positions: one sample is enough.
    cnn = spec_payload(
        dataset={"name": "mnist1d", "batch_size": 1},
        model={"architecture": "cnn", "hidden_sizes": [4], "normalization": norm},
    )
    assert client.post("/v1/jobs", json=cnn).status_code == 201


def test_a_model_that_could_not_learn_is_422_and_stores_nothing(client: TestClient) -> None:
    norm = {"type": "instance_norm", "position": "after_activation"}
    payload = spec_payload(
        model={"architecture": "resnet", "hidden_sizes": [4], "normalization": norm}
    )
    response = client.post("/v1/jobs", json=payload)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "model.normalization.position"
    assert "not depend on the input" in error["message"]
    assert client.get("/v1/jobs").json()["items"] == []


def test_limits_are_422_that_say_the_limit(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=spec_payload(epochs=100_000))
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"field": "epochs", "message": "at most 500 epochs (TRAINSVC_MAX_EPOCHS)"}
    ]
    response = client.post(
        "/v1/jobs", json=spec_payload(model={"hidden_sizes": [4096, 4096, 4096]})
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "model"
    assert "parameters" in response.json()["detail"][0]["message"]


def test_activations_over_the_memory_limit_are_422_however_few_the_parameters(
    client: TestClient,
) -> None:
    """17 M parameters passed the parameter limit, and the worker ran out of memory: 1437
    digits at once through 4096 channels of 8x8 positions take 1.5 GB a tensor."""
    wide = {"architecture": "cnn", "hidden_sizes": [4096, 4096], "kernel_size": 1}
    payload = spec_payload(dataset={"name": "digits", "batch_size": 65536}, model=wide)
    response = client.post("/v1/jobs", json=payload)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "model"
    assert "TRAINSVC_MAX_JOB_MEMORY_BYTES" in error["message"]
    assert client.get("/v1/jobs").json()["items"] == []
    narrow = {**wide, "hidden_sizes": [64, 64]}
    payload = spec_payload(dataset={"name": "digits", "batch_size": 65536}, model=narrow)
    assert client.post("/v1/jobs", json=payload).status_code == 201


def test_unknown_dataset_is_422(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=spec_payload(dataset={"name": "imagenet"}))
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "dataset.name"
    missing = f"upload:{uuid.uuid4()}"
    response = client.post("/v1/jobs", json=spec_payload(dataset={"name": missing}))
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"field": "dataset.name", "message": f"no uploaded dataset {missing!r}"}
    ]


def test_malformed_json_is_422_not_500(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    # The body is at fault, and where: not a field named "1" (FastAPI's offset in its place).
    assert response.json()["detail"] == [
        {
            "field": "body",
            "message": "not valid JSON at character 1: "
            "Expecting property name enclosed in double quotes",
        }
    ]
    response = client.post("/v1/jobs", json=["a", "list"])
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["detail"]] == ["body"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON here: nested too deeply to parse"),
        (
            b'{"epochs": ' + b"9" * 5000 + b"}",
            "not valid JSON here: an integer of more than 4300 digits",
        ),
        (b'{"name": "caf\xe9"}', "not valid JSON: not UTF-8 text (invalid continuation byte"),
    ],
    ids=["nested", "long-integer", "latin-1"],
)
def test_json_that_python_cannot_parse_is_422_saying_why(
    client: TestClient, body: bytes, reason: str
) -> None:
    """Valid JSON syntax, or nearly, that json.loads still refuses: FastAPI answers a bare 400
    ("There was an error parsing the body"), which names neither the body nor the reason."""
    response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "body"
    assert error["message"].startswith(reason)


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        ("text/plain; charset=utf-8", "text/plain"),
        ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),  # curl -d
        (None, "none"),
    ],
)
def test_a_json_body_sent_as_another_media_type_is_told_so(
    client: TestClient, content_type: str | None, named: str
) -> None:
    """FastAPI reads only a JSON content type as JSON; the spec itself was fine."""
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/jobs", content=json.dumps(spec_payload()), headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "field": "body",
            "message": "send the body as JSON with Content-Type: application/json "
            f"(this request's Content-Type: {named})",
        }
    ]
    assert client.get("/v1/jobs").json()["items"] == []


def test_body_over_limit_is_413(client: TestClient) -> None:
    payload = spec_payload(tags={f"k{i}": "x" * 250 for i in range(32)}, name="x" * 200)
    payload["padding"] = "y" * 300_000
    response = client.post("/v1/jobs", json=payload)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_unknown_job_is_404(client: TestClient) -> None:
    missing = uuid.uuid4()
    for path in ("", "/metrics", "/checkpoints", f"/checkpoints/{uuid.uuid4()}"):
        response = client.get(f"/v1/jobs/{missing}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"] == "job_not_found"
    assert client.post(f"/v1/jobs/{missing}/cancel").status_code == 404
    assert client.get("/v1/jobs/not-a-uuid").status_code == 422


def test_idempotency_key_returns_same_job_and_409_on_other_body(client: TestClient) -> None:
    headers = {"Idempotency-Key": "submit-42"}
    first = client.post("/v1/jobs", json=spec_payload(), headers=headers)
    again = client.post("/v1/jobs", json=spec_payload(), headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/jobs", json=spec_payload(epochs=4), headers=headers)
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_key_reused"


def test_list_is_newest_first_with_keyset_pagination(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json=spec_payload(seed=i)).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert client.get("/v1/jobs", params={"cursor": "garbage!"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_list_filters_by_status(client: TestClient, session: Session) -> None:
    running = make_job(session, status="running")
    make_job(session, status="queued")
    session.commit()
    items = client.get("/v1/jobs", params={"status": "running"}).json()["items"]
    assert [item["id"] for item in items] == [str(running.id)]
    assert client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422


def test_list_filters_by_tags(client: TestClient, session: Session) -> None:
    vision = make_job(session, tags={"team": "vision", "note": "a:b c.d"})
    make_job(session, tags={"team": "speech"})
    make_job(session, tags={"owner": "vision"})
    make_job(session, tags={})
    session.commit()

    def ids(*tags: str) -> list[str]:
        response = client.get("/v1/jobs", params={"tag": list(tags)})
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert ids("team:vision") == [str(vision.id)]
    # The value may hold colons and dots; several tags must all hold.
    assert ids("team:vision", "note:a:b c.d") == [str(vision.id)]
    assert ids("team:vision", "note:other") == []
    assert ids("team:nobody") == []
    for malformed in ("team", ":vision", 'te"am:x', "team:\x00"):
        response = client.get("/v1/jobs", params={"tag": malformed})
        assert response.status_code == 422, malformed
        assert response.json()["error"] == "validation_error"


def test_list_filters_by_tags_beyond_ascii(client: TestClient) -> None:
    """SQLite matched a path's key against the stored text, where "ü" was written "\\u00fc"."""
    tags = {"ü": "u", "日本": "x", "k": "ü"}
    job_id = client.post("/v1/jobs", json=spec_payload(tags=tags)).json()["id"]
    client.post("/v1/jobs", json=spec_payload(tags={"u": "u"}))
    for key, value in tags.items():
        response = client.get("/v1/jobs", params={"tag": f"{key}:{value}"})
        assert [item["id"] for item in response.json()["items"]] == [job_id], key


def test_cancel_queued_job_is_immediate(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None


def test_cancel_running_job_flags_it_and_finished_job_is_409(
    client: TestClient, session: Session
) -> None:
    running = make_job(session, status="running")
    done = make_job(session, status="succeeded")
    session.commit()
    response = client.post(f"/v1/jobs/{running.id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    assert response.json()["cancel_requested"] is True
    response = client.post(f"/v1/jobs/{done.id}/cancel")
    assert response.status_code == 409
    assert response.json()["error"] == "job_not_cancellable"


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    ready = client.get("/v1/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "up", "broker": "up"}
    # HEAD, as load balancers and uptime monitors probe: the status, no body.
    for path in ("/v1/health", "/v1/ready"):
        probe = client.head(path)
        assert (probe.status_code, probe.content) == (200, b"")


def test_ready_names_the_broker_when_it_is_down(client: TestClient, session: Session) -> None:
    from app.core.broker import create_celery_app

    settings = client.app.state.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})  # type: ignore[attr-defined]
    client.app.state.dispatcher.celery = create_celery_app(settings)  # type: ignore[attr-defined]
    ready = client.get("/v1/ready")
    assert ready.status_code == 503
    assert ready.json()["down"] == ["broker"]
    assert client.head("/v1/ready").status_code == 503
    # Submitting still works: the job is stored, and waits in the outbox.
    response = client.post("/v1/jobs", json=spec_payload())
    assert response.status_code == 201
    row = session.get(Job, uuid.UUID(response.json()["id"]))
    assert row is not None
    assert row.published_at is None
    assert session.scalars(select(Job).where(Job.published_at.is_(None))).all() == [row]


def test_openapi_documents_every_path(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/checkpoints",
        "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}",
        "/v1/datasets",
        "/v1/health",
        "/v1/ready",
    }
    submit = schema["paths"]["/v1/jobs"]["post"]
    assert submit["description"].startswith("Submit a training job")
    assert client.get("/docs").status_code == 200


def test_too_many_queued_jobs_is_429_and_stores_nothing(
    client: TestClient, session: Session
) -> None:
    app_state = client.app.state  # type: ignore[attr-defined]
    app_state.settings = app_state.settings.model_copy(update={"max_queued_jobs": 2})
    for seed in range(2):
        assert client.post("/v1/jobs", json=spec_payload(seed=seed)).status_code == 201
    response = client.post("/v1/jobs", json=spec_payload(seed=2))
    assert response.status_code == 429
    assert response.json()["error"] == "too_many_queued_jobs"
    assert response.headers["Retry-After"] == "30"
    assert len(session.scalars(select(Job)).all()) == 2


def test_wall_time_over_the_cap_is_422(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=spec_payload(max_wall_seconds=10**9))
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "field": "max_wall_seconds",
            "message": "at most 86400 seconds (TRAINSVC_MAX_WALL_SECONDS)",
        }
    ]


def test_framework_errors_answer_in_the_service_format(client: TestClient) -> None:
    unknown = client.get("/v1/nowhere")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "not_found", "detail": "no route /v1/nowhere"}

    # A trailing slash is no route either: not a 307 to a Location built from the Host header.
    slashed = client.get("/v1/jobs/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert slashed.status_code == 404
    assert slashed.json() == {"error": "not_found", "detail": "no route /v1/jobs/"}

    wrong_method = client.delete("/v1/jobs")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method_not_allowed"
    assert "DELETE" in wrong_method.json()["detail"]
    assert set(wrong_method.headers["Allow"].split(", ")) == {"GET", "POST"}

    malformed = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 422
    assert malformed.json()["error"] == "validation_error"

    wrong_type = client.post(
        "/v1/jobs", content=b'{"epochs": 1}', headers={"content-type": "text/plain"}
    )
    assert wrong_type.status_code == 422
    assert wrong_type.json()["error"] == "validation_error"

    broken_multipart = client.post(
        "/v1/datasets",
        content=b"--b\r\nnot a part",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert broken_multipart.status_code in (400, 422)
    assert set(broken_multipart.json()) == {"error", "detail"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/jobs", spec_payload()),
        # A study's key was taken as given: "" became a key that all keyless-looking
        # creates shared, and of two keys the first won.
        ("/v1/studies", {"base": spec_payload(), "grid": {"seed": [0, 1]}}),
    ],
)
def test_an_empty_or_repeated_idempotency_key_is_422_naming_the_header(
    client: TestClient, session: Session, path: str, body: dict[str, Any]
) -> None:
    empty = client.post(path, json=body, headers={"Idempotency-Key": ""})
    assert empty.status_code == 422, empty.text
    assert empty.json()["detail"][0]["field"] == "idempotency-key"

    repeated = client.post(
        path, json=body, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    )
    assert repeated.status_code == 422, repeated.text
    assert repeated.json()["detail"] == [
        {"field": "idempotency-key", "message": "send one Idempotency-Key header, not 2"}
    ]
    assert session.scalars(select(Job)).all() == []


def test_infinite_or_nan_floats_are_422(client: TestClient, session: Session) -> None:
    for raw in (
        b'{"dataset": {"name": "digits"}, "epochs": 1, "schedule": {"min_lr": 1e999}}',
        b'{"dataset": {"name": "digits"}, "epochs": 1, "grad_clip_norm": Infinity}',
        b'{"dataset": {"name": "digits"}, "epochs": 1, "optimizer": {"betas": [NaN, 0.9]}}',
        b'{"dataset": {"name": "digits"}, "epochs": 1, "early_stopping": {"min_delta": -Infinity}}',
    ):
        response = client.post(
            "/v1/jobs", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, (raw, response.text)
        assert response.json()["error"] == "validation_error"
    assert session.scalars(select(Job)).all() == []


def test_cosine_min_lr_above_lr_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs",
        json=spec_payload(
            optimizer={"type": "adam", "lr": 0.001}, schedule={"type": "cosine", "min_lr": 0.01}
        ),
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "schedule.min_lr"


def test_nul_characters_in_spec_strings_are_422(client: TestClient, session: Session) -> None:
    for payload in (
        spec_payload(name="bad\x00name"),
        spec_payload(tags={"team": "vi\x00sion"}),
        spec_payload(tags={"te\x00am": "vision"}),
        spec_payload(dataset={"name": "dig\x00its"}),
    ):
        response = client.post("/v1/jobs", json=payload)
        assert response.status_code == 422, response.text
        assert "NUL" in response.json()["detail"][0]["message"]
    assert session.scalars(select(Job)).all() == []


def test_lone_surrogates_in_spec_strings_are_422_and_nothing_is_stored(
    client: TestClient, session: Session
) -> None:
    """A "\\ud800" tag value was stored, then every list, get and cancel of it answered 500."""
    for payload, field in (
        (spec_payload(name="bad@name"), "name"),
        (spec_payload(tags={"team": "vi@sion"}), "tags.team"),
        (spec_payload(tags={"te@am": "vision"}), "tags.te"),  # then the key, as pydantic shows it
        (spec_payload(dataset={"name": "dig@its"}), "dataset.name"),
    ):
        response = client.post(
            "/v1/jobs",
            content=with_lone_surrogate(payload),
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert "unicode" in error["message"].lower(), error  # ours, or pydantic-core's own
        assert error["field"].startswith(field), error
    assert session.scalars(select(Job)).all() == []


def test_a_string_too_long_is_422_counting_characters(client: TestClient) -> None:
    """The limit read "Value should have at most 200 items after validation" for a name."""
    for payload, field, limit in (
        (spec_payload(name="x" * 201), "name", 200),
        (spec_payload(tags={"k": "v" * 257}), "tags.k", 256),
        (spec_payload(dataset={"name": "d" * 201}), "dataset.name", 200),
    ):
        response = client.post("/v1/jobs", json=payload)
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {"field": field, "message": f"String should have at most {limit} characters"}
        ]


def test_an_error_quoting_a_lone_surrogate_still_renders() -> None:
    """An error's field may quote the client's input; UTF-8 cannot encode a lone surrogate."""
    field = "grid.\ud800"
    response = ErrorResponse({"error": "validation_error", "detail": [{"field": field}]}, 422)
    assert json.loads(response.body)["detail"] == [{"field": field}]


def test_the_stored_spec_resubmitted_is_the_same_job(client: TestClient) -> None:
    headers = {"Idempotency-Key": "round-trip"}
    created = client.post(
        "/v1/jobs", json={"dataset": {"name": "two_moons"}, "epochs": 2}, headers=headers
    )
    assert created.status_code == 201
    shown = client.get(f"/v1/jobs/{created.json()['id']}").json()["spec"]
    again = client.post("/v1/jobs", json=shown, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == created.json()["id"]
    assert again.json()["spec"] == shown


_SPEC_VARIATIONS = st.fixed_dictionaries(
    {
        "dataset": st.fixed_dictionaries(
            {"name": st.sampled_from(["digits", "two_moons", "mnist1d", "iris"])},
            optional={
                "val_fraction": st.floats(0.05, 0.5),
                "label_noise": st.floats(0.0, 0.5),
            },
        ),
        "epochs": st.integers(1, 50),
    },
    optional={
        "model": st.fixed_dictionaries(
            {},
            optional={
                "hidden_sizes": st.lists(st.sampled_from([8, 16, 32]), min_size=1, max_size=3),
                "normalization": st.fixed_dictionaries(
                    {"type": st.sampled_from(["none", "batch_norm", "layer_norm", "rms_norm"])}
                ),
                "dropout": st.fixed_dictionaries({"rate": st.floats(0.0, 0.9)}),
            },
        ),
        "optimizer": st.fixed_dictionaries(
            {"type": st.sampled_from(["adam", "adamw", "sgd"]), "lr": st.floats(1e-5, 1.0)}
        ),
        "schedule": st.fixed_dictionaries(
            {"type": st.sampled_from(["constant", "step", "cosine"])},
            optional={"min_lr": st.floats(0.0, 1e-5), "gamma": st.floats(0.01, 1.0)},
        ),
        "grad_clip_norm": st.floats(1e-3, 1e3),
        "name": st.text(max_size=20),
        "tags": st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3),
    },
)


@hypothesis_settings(max_examples=200, deadline=None, derandomize=True)
@given(_SPEC_VARIATIONS)
def test_a_stored_spec_validates_back_to_itself(payload: dict[str, Any]) -> None:
    """What GET shows (the spec's JSON dump) is accepted again and hashes the same."""
    try:
        spec = JobSpec.model_validate(payload)
    except ValidationError:
        return  # an impossible combination: refused at submit, never stored
    shown = json.loads(json.dumps(spec.model_dump(mode="json"), allow_nan=False))
    again = JobSpec.model_validate(shown)
    assert again == spec
    assert spec_sha256(again) == spec_sha256(spec)


def test_since_epoch_beyond_any_epoch_is_422_not_500(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/metrics", params={"since_epoch": 10**30})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "since_epoch"
    response = client.get(f"/v1/jobs/{job_id}/metrics", params={"since_epoch": 2**31 - 1})
    assert response.json()["epochs"] == []


def test_openapi_declares_every_error_in_the_error_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert set(schema["components"]["schemas"]["ErrorBody"]["required"]) == {"error", "detail"}
    keyed = {"401", "429"}  # behind the API key: refused keys, and the key's request rate
    everywhere = {"413", "431"}  # a body or head over its size limit is refused before routing
    expected = {
        ("post", "/v1/jobs"): {"200", "201", "400", "409", "422", "503"} | keyed,
        ("get", "/v1/jobs"): {"200", "422", "503"} | keyed,
        ("get", "/v1/jobs/{job_id}"): {"200", "304", "404", "422", "503"} | keyed,
        ("post", "/v1/jobs/{job_id}/cancel"): {"202", "404", "409", "422", "503"} | keyed,
        ("get", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}"): {"200", "404", "422", "503"}
        | keyed,
        ("post", "/v1/datasets"): {"201", "400", "422", "503"} | keyed,
        ("post", "/v1/studies"): {"200", "201", "400", "409", "422", "503"} | keyed,
        ("delete", "/v1/studies/{study_id}"): {"204", "404", "409", "422", "503"} | keyed,
        # Keyed, an admin's, when TRAINSVC_METRICS_REQUIRE_KEY is set.
        ("get", "/metrics"): {"200", "403"} | keyed,
        ("get", "/v1/ready"): {"200", "503"},
    }
    for (method, path), statuses in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert set(responses) == statuses | everywhere, (method, path)
        for status, response in responses.items():
            if status.startswith(("4", "5")) and (path, status) != ("/v1/ready", "503"):
                content = response["content"]["application/json"]["schema"]
                assert content == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    assert schema["components"]["schemas"]["JobStatus"]["enum"] == [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    status_param = next(
        p for p in schema["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "status"
    )
    assert "#/components/schemas/JobStatus" in str(status_param["schema"])


def _store_checkpoint(session: Session, job: Job, weights: bytes) -> Checkpoint:
    checkpoint = make_checkpoint(job.id, weights)
    session.add(checkpoint)
    session.commit()
    return checkpoint


def test_checkpoint_download_is_streamed_in_chunks(
    client: TestClient, session: Session, engine: Engine
) -> None:
    weights = os.urandom(2 * service.DOWNLOAD_CHUNK_BYTES + 12345)
    checkpoint = _store_checkpoint(session, make_job(session, status="succeeded"), weights)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        response = client.get(f"/v1/jobs/{checkpoint.job_id}/checkpoints/{checkpoint.id}")
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200
    assert response.content == weights
    assert response.headers["Content-Length"] == str(len(weights))
    assert response.headers["ETag"] == f'"{checkpoint.sha256}"'
    blob_reads = [s for s in statements if "checkpoints.weights" in s]
    # Three chunks, each a substring of the blob: never the whole blob in one read.
    assert len(blob_reads) == 3
    assert all("substr(checkpoints.weights" in s for s in blob_reads), blob_reads


def test_a_checkpoint_rewritten_during_a_download_ends_the_stream(
    session: Session, session_factory: sessionmaker[Session]
) -> None:
    weights = os.urandom(3000)
    checkpoint = _store_checkpoint(session, make_job(session, status="running"), weights)
    chunks = service.stream_weights(session_factory, checkpoint, chunk_bytes=1000)
    assert next(chunks) == weights[:1000]
    session.execute(
        update(Checkpoint).where(Checkpoint.id == checkpoint.id).values(sha256="0" * 64)
    )
    session.commit()
    with pytest.raises(service.CheckpointChanged):
        next(chunks)


def test_more_layers_than_max_layers_is_422(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=spec_payload(model={"hidden_sizes": [8] * 17}))
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"field": "model.hidden_sizes", "message": "at most 16 layers (TRAINSVC_MAX_LAYERS)"}
    ]
    assert (
        client.post("/v1/jobs", json=spec_payload(model={"hidden_sizes": [8] * 16})).status_code
        == 201
    )


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("/v1/jobs?offset=50", "offset", "this operation has no such query parameter; it takes: "),
        ("/v1/jobs?status=queued&status=failed", "status", "sent 2 times; it takes one value"),
        ("/v1/jobs?limit=1&limit=2", "limit", "sent 2 times; it takes one value"),
        ("/v1/datasets?tenant=a&tenant=b", "tenant", "sent 2 times; it takes one value"),
        ("/v1/studies/presets?limit=5", "limit", "it takes: none"),
    ],
)
def test_an_undeclared_or_repeated_query_parameter_is_422(
    client: TestClient, query: str, field: str, message: str
) -> None:
    # FastAPI ignored the one and kept the last of the other: a client paging with ?offset=
    # got the first page again and again, as if that were the page it asked for.
    response = client.get(query)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == field
    assert message in error["message"]


def test_a_query_parameter_that_takes_several_values_still_takes_them(client: TestClient) -> None:
    response = client.get("/v1/jobs?tag=team:a&tag=owner:b&limit=5")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/v1/jobs", b'{"dataset": {"name": "digits"}, "epochs": 1, "epochs": 2}', "epochs"),
        (
            "/v1/jobs",
            b'{"dataset": {"name": "digits", "name": "upload:x"}, "epochs": 1}',
            "name",
        ),
        ("/v1/studies", b'{"base": {}, "base": {}}', "base"),
    ],
)
def test_a_json_key_repeated_in_one_object_is_422_and_nothing_is_stored(
    client: TestClient, path: str, body: bytes, key: str
) -> None:
    # json.loads kept the last, a proxy or audit log reading the same body may keep the first.
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == [
        {
            "field": "body",
            "message": f"the key {key!r} appears twice in one object; send each key once",
        }
    ]
    assert client.get("/v1/jobs").json()["items"] == []
