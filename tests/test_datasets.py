"""Arrays into the service without files: POST /datasets on a real `polyak serve`, driven by Client.upload."""

from __future__ import annotations

import hashlib
import io
import socket
import time

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_iris
from test_service import Server, wait_for

from polyak import BadInput, Client, DatasetNotFound, JobConflict, JobState, SpecError, Unauthorized
from polyak.client.sdk import upload_table

TOKEN = "t" * 32
LIMIT = 200_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with a token and a small upload limit; started here (its own), stopped at the end."""
    server = Server(tmp_path_factory.mktemp("datasets") / "data", "--token", TOKEN,
                    "--max-dataset-bytes", str(LIMIT)).start()
    yield server
    server.stop_or_kill()


@pytest.fixture
def client(server) -> Client:
    return server.client(TOKEN)


def stored(server) -> list[str]:
    return sorted(p.name for p in (server.data_dir / "datasets").iterdir())


def iris():
    X, y = load_iris(return_X_y=True)
    return X, y


def test_an_upload_is_stored_once_under_the_hash_of_its_bytes(client, server):
    X, y = iris()
    first = client.upload(X, y)
    table = upload_table(X, y)
    sent = io.BytesIO()
    np.save(sent, table)  # what Client.upload streams is exactly np.save's file of the table
    assert first.id == hashlib.sha256(sent.getvalue()).hexdigest()
    assert (first.format, first.rows, first.columns, first.bytes) == ("npy", 150, 5, len(sent.getvalue()))
    again = client.upload(X, y)
    assert again.id == first.id and f"{first.id}.npy" in stored(server)
    assert [d.id for d in client.datasets()].count(first.id) == 1
    assert client.dataset(first.id) == again
    # The same upload answered 200 the second time, 201 the first (seen on the raw API).
    response = httpx.post(f"{server.url}/datasets", content=sent.getvalue(),
                          headers={"Content-Type": "application/x-npy", "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json()["id"] == first.id


def test_a_job_trains_from_an_uploaded_dataset_as_from_the_same_file(client, server, tmp_path):
    X, y = iris()
    dataset = client.upload(X, y)
    spec = {"model": {"layers": [4, 8, 3]}, "cluster": {"num_workers": 0}, "stopping": {"max_epochs": 3},
            "data": {"validation_fraction": 0.2}}
    from_upload = client.submit({**spec, "data": {**spec["data"], "source": "dataset", "name": dataset.id}})
    path = tmp_path / "iris.npy"
    np.save(path, upload_table(X, y))
    # The reference: the same table from a file the server reads (this server has no data root).
    from_file = client.submit({**spec, "data": {**spec["data"], "source": "file", "path": str(path)}})
    a, b = from_upload.wait(timeout=120), from_file.wait(timeout=120)
    assert a.state == b.state == JobState.SUCCEEDED
    assert a.spec.data.name == dataset.id and a.spec.data.path.endswith(f"datasets/{dataset.id}.npy")
    assert [m.train_loss for m in from_upload.metrics()] == [m.train_loss for m in from_file.metrics()]
    with pytest.raises(JobConflict, match=r"read by job\(s\)"):
        # Not while a job that has not ended reads it: one queued behind nothing is enough to see it.
        blocked = client.submit({**spec, "stopping": {"max_epochs": 100000},
                                 "data": {"source": "dataset", "name": dataset.id}})
        try:
            wait_for(lambda: blocked.info().state == JobState.RUNNING, timeout=60)
            client.delete_dataset(dataset.id)
        finally:
            blocked.cancel()
    blocked.wait(timeout=60)
    client.delete_dataset(dataset.id)
    with pytest.raises(DatasetNotFound):
        client.dataset(dataset.id)
    with pytest.raises(SpecError, match=f"data.name: no dataset with id {dataset.id}"):
        client.submit({**spec, "data": {"source": "dataset", "name": dataset.id}})


def test_what_is_refused_is_one_line_and_leaves_nothing(client, server):
    before = stored(server)
    with pytest.raises(BadInput, match=f"over the server's limit of {LIMIT} bytes"):
        client.upload(np.zeros((LIMIT // 8, 2)))
    with pytest.raises(SpecError, match="not a .npy file: the magic string is not correct"):
        client._request("POST", "/datasets", dict, content=np.arange(5.0).tobytes() + b"x" * 100,
                        headers={"Content-Type": "application/x-npy"})
    one_d = io.BytesIO()
    np.save(one_d, np.arange(10.0))
    with pytest.raises(SpecError, match=r"2-D real table .* shape \(10,\)"):
        client._request("POST", "/datasets", dict, content=one_d.getvalue(),
                        headers={"Content-Type": "application/x-npy"})
    with pytest.raises(BadInput, match="say the upload's format"):
        client._request("POST", "/datasets", dict, content=b"abc", headers={"Content-Type": "text/plain"})
    with pytest.raises(BadInput, match="X must be numeric to upload, got dtype <U1"):
        client.upload(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(Unauthorized):
        Client(server.url).datasets()
    assert stored(server) == before


def test_an_upload_cut_off_mid_stream_leaves_nothing(client, server):
    before = stored(server)
    table = np.random.default_rng(0).standard_normal((4000, 5))
    body = io.BytesIO()
    np.save(body, table)
    data = body.getvalue()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall((f"POST /datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                   f"Content-Type: application/x-npy\r\nContent-Length: {len(data)}\r\n\r\n").encode())
        s.sendall(data[: len(data) // 2])
        time.sleep(0.5)  # the server is now writing the first half
    # Connection closed with half the body sent: no dataset, no temporary file, and the server goes on.
    wait_for(lambda: stored(server) == before, timeout=30)
    assert not any(p.name.startswith(".upload-") for p in (server.data_dir / "datasets").iterdir())
    assert client.upload(table).rows == 4000


def test_a_dataset_cannot_train_outside_a_server():
    from polyak.contract.errors import DataError
    from polyak.contract.spec import parse_spec
    from polyak.workers.data import prepare

    spec = parse_spec({"data": {"source": "dataset", "name": "a" * 64}, "model": {"layers": [4, 3]}})
    with pytest.raises(DataError, match="names an upload to a polyak server") as e:
        prepare(spec.data, spec.model)
    assert e.value.field == "data.source"
    with pytest.raises(SpecError, match="data.name: a dataset is named by its id"):
        parse_spec({"data": {"source": "dataset", "name": "digits"}})
