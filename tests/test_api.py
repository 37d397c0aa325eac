"""The API in this process (FastAPI's TestClient over a scheduler with a stand-in cluster, its lifespan not run:
nothing is dispatched): how each error is answered, where the app keeps its state, the token check.

tests/test_service.py drives the same API end to end, through a real ``polyak serve``.
"""

from __future__ import annotations

import json

import pytest
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

    def make(token: str | None = None, cpus: float = 2) -> TestClient:
        store = Store(tmp_path / f"data-{len(made)}")
        app = create_app(Scheduler(store, FakeCluster(cpus), 1, train=FakeTrainer()), token=token,
                         data_root=tmp_path)
        client = TestClient(app, raise_server_exceptions=False)
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
