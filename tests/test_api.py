"""The API in this process (FastAPI's TestClient over a scheduler with a stand-in cluster, its lifespan not run:
nothing is dispatched): how each error is answered, where the app keeps its state, the token check.

tests/test_service.py drives the same API end to end, through a real ``polyak serve``.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from test_scheduler import FakeCluster, FakeTrainer

from polyak.contract.errors import DataError
from polyak.contract.spec import parse_spec
from polyak.service.server import (
    routes_datasets,
    routes_health,
    routes_jobs,
    routes_metrics,
    routes_pages,
    routes_weights,
)
from polyak.service.server.api import create_app
from polyak.service.server.context import Service
from polyak.service.server.scheduler import Scheduler
from polyak.service.server.store import Store
from polyak.service.server.submission import as_spec_error
from polyak.workers.data import check_cheaply

TOKEN = "api-secret"


@pytest.fixture
def make_client(tmp_path):
    made: list[tuple[TestClient, Store]] = []

    def make(token: str | None = None, cpus: float = 2, store: Store | None = None, **options) -> TestClient:
        """A TestClient of the API over a scheduler that dispatches nothing, on ``store`` (default: a new one)."""
        store = store or Store(tmp_path / f"data-{len(made)}")
        app = create_app(Scheduler(store, FakeCluster(cpus), 1, train=FakeTrainer()), token=token,
                         data_root=tmp_path, **options)
        client = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
        made.append((client, store))
        return client

    yield make
    for client, store in made:
        client.close()
        store.close()


def post(client: TestClient, spec: dict, **headers: str):
    return client.post("/jobs", content=json.dumps(spec), headers={"Content-Type": "application/json", **headers})


def test_the_app_keeps_its_state_in_one_record_and_its_routes_in_modules(make_client, tmp_path):
    client = make_client(token=TOKEN)
    service = client.app.state.service
    assert isinstance(service, Service)
    assert (service.token, service.data_root, service.store) == (TOKEN, tmp_path, service.scheduler.store)
    routers = [m.router for m in (routes_pages, routes_health, routes_jobs, routes_metrics, routes_weights,
                                  routes_datasets)]
    endpoints = {route.path: route.endpoint for router in routers for route in router.routes}
    assert endpoints.keys() == {*client.app.openapi()["paths"], "/", "/docs"}  # every route is one of theirs
    closures = sorted(f"{f.__module__}.{f.__qualname__}" for f in endpoints.values() if "<locals>" in f.__qualname__)
    assert closures == []


def test_a_job_too_big_for_the_cluster_is_a_422_naming_the_field(make_client):
    """ClusterTooSmall has a type of its own now; the answer is what it was as a spec error."""
    response = post(make_client(cpus=2), {"cluster": {"num_workers": 3}})
    words = "3 workers need 3 CPUs (one each) but the Ray cluster has 2"
    assert response.status_code == 422
    assert response.json() == {"detail": f"invalid job spec: cluster.num_workers: {words}",
                               "errors": [{"field": "cluster.num_workers", "message": words}]}


def test_data_that_does_not_suit_the_spec_is_a_422_at_the_field_its_data_error_names(make_client, monkeypatch):
    client = make_client()
    spec = {"model": {"layers": [5, 16, 10]}, "cluster": {"num_workers": 0}}
    parsed = parse_spec(spec)
    with pytest.raises(DataError) as raised:
        check_cheaply(parsed.data, parsed.model)
    response = post(client, spec)
    assert response.status_code == 422
    assert response.json()["errors"] == [{"field": raised.value.field, "message": raised.value.message}]
    assert "model.layers[0] = 5" in response.json()["detail"]

    # The field is the DataError's own, whatever its message says.
    def unsuitable(data, model):
        raise DataError("iris.csv: column 'species' holds text", field="data.target")

    monkeypatch.setattr("polyak.service.server.submission.check_cheaply", unsuitable)
    response = post(client, {"cluster": {"num_workers": 0}})
    assert (response.status_code, response.json()) == (422, {
        "detail": "invalid job spec: iris.csv: column 'species' holds text",
        "errors": [{"field": "data.target", "message": "iris.csv: column 'species' holds text"}]})


def test_a_data_error_becomes_a_spec_error_at_its_field():
    error = as_spec_error(DataError("model.loss = mse does not suit sklearn dataset 'iris'", field="model.loss"))
    assert error.message == "model.loss = mse does not suit sklearn dataset 'iris'"
    assert error.errors == [{"field": "model.loss", "message": error.message}]


@pytest.mark.parametrize(("query", "field", "message"), [
    ("/jobs?limit=0", "limit", "must be >= 1, got '0'"),
    ("/jobs?offset=-1", "offset", "must be >= 0, got '-1'"),
    ("/jobs?limit=many", "limit", "must be an integer, got 'many'"),
    ("/jobs/x/weights?which=worst", "which", "must be one of 'last' or 'best', got 'worst'"),
    ("/jobs/x/events?after=-2", "after", "must be >= 0, got '-2'"),
])
def test_a_bad_parameter_is_a_422_in_the_words_of_a_bad_spec(make_client, query, field, message):
    response = make_client().get(query)
    assert (response.status_code, response.json()) == (422, {
        "detail": f"invalid request: {field}: {message}", "errors": [{"field": field, "message": message}]})


def test_the_token_guards_the_json_api_but_not_the_page_or_health(make_client):
    client = make_client(token=TOKEN)
    for path in ("/jobs", "/jobs/x", "/jobs/x/metrics", "/jobs/x/events", "/jobs/x/weights"):
        missing, wrong = client.get(path), client.get(path, headers={"Authorization": "Bearer nope"})
        assert (missing.status_code, wrong.status_code) == (401, 401), path
        assert missing.json()["detail"].startswith("missing bearer token")
        assert wrong.json() == {"detail": "wrong bearer token"}
        assert missing.headers["www-authenticate"] == "Bearer"
    assert post(client, {}).status_code == 401
    assert client.get("/jobs/x", headers={"Authorization": f"Bearer {TOKEN}"}).json() == {
        "detail": "no job with id x"}
    assert [client.get(path).status_code for path in ("/", "/docs", "/health", "/dashboard/app.js")] == [200] * 4


HUGE = "6431843600666319761840544580261380096"  # over SQLite's 64-bit INTEGER: once a 500 (OverflowError)


@pytest.mark.parametrize(("query", "headers", "field"), [
    (f"/jobs?offset={HUGE}", {}, "offset"),
    (f"/jobs/x/events?after={HUGE}", {}, "after"),
    ("/jobs/x/events", {"Last-Event-ID": HUGE}, "last-event-id"),
])
def test_an_integer_parameter_too_large_for_the_store_is_a_422(make_client, query, headers, field):
    response = make_client().get(query, headers=headers)
    message = f"must be <= {2**62}, got '{HUGE}'"
    assert (response.status_code, response.json()) == (422, {
        "detail": f"invalid request: {field}: {message}", "errors": [{"field": field, "message": message}]})


def test_the_schema_publishes_the_error_body_the_api_sends_for_every_error_status(make_client):
    schema = make_client().app.openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert schema["components"]["schemas"]["ErrorBody"]["required"] == ["detail"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = {code for code in operation["responses"] if code >= "400"}
            for code in codes:
                assert operation["responses"][code]["content"]["application/json"]["schema"] == error_ref, (
                    method, path, code)
            assert {"400", "403"} <= codes, (method, path)  # the Host and Origin checks, everywhere
            assert ("401" in codes) == (path != "/health"), (method, path)  # documented with or without a token
    statuses = {(method, path): set(operation["responses"]) for path, operations in schema["paths"].items()
                for method, operation in operations.items()}
    assert {"413", "415", "422"} <= statuses["post", "/jobs"]
    assert {"404", "503"} <= statuses["get", "/jobs/{job_id}/events"]
    assert "409" in statuses["post", "/jobs/{job_id}/resubmit"] & statuses["delete", "/datasets/{dataset_id}"]


def test_a_name_over_200_characters_is_a_422(make_client):
    response = post(make_client(), {"name": "n" * 201, "cluster": {"num_workers": 0}})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "name"
    assert "at most 200 characters" in response.json()["errors"][0]["message"]
    assert post(make_client(), {"name": "n" * 200, "cluster": {"num_workers": 0}}).status_code == 201


SPEC_YAML = "cluster:\n  num_workers: 0\n"


@pytest.mark.parametrize("media", ["application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
                                   "application/json", "application/spec+json", "text/yaml; charset=utf-8"])
def test_a_spec_is_accepted_as_json_or_yaml(make_client, media):
    body = json.dumps({"cluster": {"num_workers": 0}}) if "json" in media else SPEC_YAML
    response = make_client().post("/jobs", content=body, headers={"Content-Type": media})
    assert response.status_code == 201, response.text


def test_a_spec_in_any_other_media_type_is_a_415_before_the_body_is_read(make_client):
    """A browser sends these cross-site without asking: they were parsed as YAML and queued (201)."""
    client = make_client()
    for media, kwargs in [("text/plain", {"content": SPEC_YAML}), (None, {"data": {"cluster": "x"}}),
                          (None, {"files": {"spec": ("spec.yaml", SPEC_YAML)}}), ("", {"content": SPEC_YAML})]:
        headers = {} if media is None else {"Content-Type": media}
        response = client.post("/jobs", headers=headers, **kwargs)
        assert response.status_code == 415, (media, kwargs)
        assert response.json()["detail"].startswith("Content-Type '")
        assert "send application/json or application/yaml" in response.json()["detail"]
    assert client.get("/jobs").json() == []


def test_a_cross_origin_request_is_a_403_and_the_same_origin_passes(make_client):
    client = make_client()
    foreign = {"Origin": "http://evil.example"}
    refused = client.post("/jobs", content=SPEC_YAML, headers={"Content-Type": "application/yaml", **foreign})
    assert refused.status_code == 403
    assert refused.json() == {"detail": "cross-origin request from 'http://evil.example' refused: only this "
                                        "server's own pages may call it"}
    assert client.get("/jobs", headers=foreign).status_code == 403
    assert client.get("/jobs", headers={"Origin": "http://localhost:9999"}).status_code == 403  # another port
    assert client.get("/jobs", headers={"Origin": "null"}).status_code == 403  # a sandboxed page
    own = client.post("/jobs", content=SPEC_YAML, headers={"Content-Type": "application/yaml",
                                                           "Origin": "http://localhost"})
    assert own.status_code == 201
    assert [job["id"] for job in client.get("/jobs").json()] == [own.json()["id"]]


def test_a_host_not_this_servers_is_a_400_unless_allowed(make_client):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: its Host header gives it away."""
    client = make_client()
    response = client.get("/jobs", headers={"Host": "rebind.evil.example:8765"})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("invalid Host header 'rebind.evil.example:8765'")
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
    for host in ("localhost:8765", "127.0.0.1", "[::1]:8765", "LOCALHOST"):
        assert client.get("/jobs", headers={"Host": host}).status_code == 200, host
    allowed = make_client(allowed_hosts=["127.0.0.1", "polyak.internal"])
    assert allowed.get("/jobs", headers={"Host": "polyak.internal:8765"}).status_code == 200
    assert allowed.get("/jobs", headers={"Host": "other.internal"}).status_code == 400
    assert make_client(allowed_hosts=["*"]).get("/jobs", headers={"Host": "any.where"}).status_code == 200


@pytest.fixture
def live_server(tmp_path):
    """The app behind a real uvicorn in a thread (event streams need one: TestClient reads a response whole),
    without its lifespan: nothing is dispatched, so a submitted job stays queued and its stream open."""
    store = Store(tmp_path / "data")
    app = create_app(Scheduler(store, FakeCluster(2), 1, train=FakeTrainer()), data_root=tmp_path, max_listeners=2)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    store.close()


def first_event(lines) -> str:
    return next(line for line in lines if line.startswith("event:"))


def test_event_streams_beyond_max_listeners_are_a_503_and_the_open_ones_go_on(live_server):
    with httpx.Client(base_url=live_server, timeout=10) as http, ExitStack() as streams:
        job = http.post("/jobs", content=SPEC_YAML, headers={"Content-Type": "application/yaml"}).json()["id"]
        open_lines = []
        for _ in range(2):
            response = streams.enter_context(http.stream("GET", f"/jobs/{job}/events"))
            assert response.status_code == 200
            open_lines.append(response.iter_lines())
            assert first_event(open_lines[-1]) == "event: state"
        refused = http.get(f"/jobs/{job}/events")
        assert refused.status_code == 503
        assert refused.json() == {"detail": f"too many event streams open (polyak serve --max-listeners 2): try "
                                            f"again later, or poll GET /jobs/{job}"}
        assert http.post(f"/jobs/{job}/cancel").json()["state"] == "cancelled"
        for lines in open_lines:  # both still hear the job: its new state, then the end
            assert [first_event(lines), first_event(lines)] == ["event: state", "event: end"]
    # Ended and closed, the streams freed their slots.
    with httpx.Client(base_url=live_server, timeout=10) as http:
        job = http.post("/jobs", content=SPEC_YAML, headers={"Content-Type": "application/yaml"}).json()["id"]
        with http.stream("GET", f"/jobs/{job}/events") as first, http.stream("GET", f"/jobs/{job}/events") as second:
            assert (first.status_code, second.status_code) == (200, 200)
            assert http.get(f"/jobs/{job}/events").status_code == 503
        # Closed by their client while the job goes on: freed as well (once the server notices).
        deadline = time.monotonic() + 10
        while (status := stream_status(http, f"/jobs/{job}/events")) == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 200


def stream_status(http: httpx.Client, path: str) -> int:
    with http.stream("GET", path) as response:
        return response.status_code
