"""The SDK against httpx.MockTransport: requests, parsing, error mapping, SSE and reconnects."""

from __future__ import annotations

import io
import json
import math
import time
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest

from polyak import (
    Client,
    Criterion,
    EpochMetrics,
    Job,
    JobConflict,
    JobInfo,
    JobNotFound,
    JobSpec,
    JobState,
    PolyakError,
    ServerError,
    SpecError,
    StopReason,
    Unauthorized,
)
from polyak.client.sdk import parse_sse

URL = "http://polyak.test:8765"
JOB = "7f3a9c2e41b8"
CREATED = datetime(2025, 3, 14, 9, 26, 53, tzinfo=timezone.utc)


def epoch_metrics(epoch: int, max_epochs: int = 5, job_id: str = JOB) -> EpochMetrics:
    """Plausible numbers for the digits MLP (1437 training samples, n' = 128, 12 steps per epoch)."""
    done = epoch == max_epochs
    weight_change = 0.4 * 0.6**epoch
    return EpochMetrics(
        job_id=job_id,
        epoch=epoch,
        step=12 * epoch,
        samples_seen=1437 * epoch,
        batch_size=128,
        lr=0.1,
        train_loss=2.3 * math.exp(-0.6 * epoch) + 0.04,
        val_loss=2.3 * math.exp(-0.5 * epoch) + 0.09,
        val_accuracy=min(0.98, 0.55 + 0.09 * epoch),
        weight_norm=11.2 + 0.8 * epoch,
        weight_change=weight_change,
        grad_avg_norm=1.9 * 0.55**epoch,
        grad_noise=0.31 * 0.8**epoch,
        samples_per_second=48210.5,
        elapsed_seconds=0.031 * epoch,
        criteria=[
            Criterion(name="max_epochs", value=epoch, threshold=max_epochs, met=done),
            Criterion(name="weight_change", value=weight_change, threshold=1e-3, met=False),
        ],
        stop=StopReason.MAX_EPOCHS if done else None,
    )


def job_info(state: JobState = JobState.QUEUED, epoch: int | None = None, job_id: str = JOB) -> JobInfo:
    spec = JobSpec(name="digits-mlp")
    terminal = state.is_terminal()
    return JobInfo(
        id=job_id,
        name=spec.name,
        state=state,
        queue_position=0 if state == JobState.QUEUED else None,
        spec=spec,
        created_at=CREATED,
        started_at=None if state == JobState.QUEUED else CREATED + timedelta(seconds=1),
        finished_at=CREATED + timedelta(seconds=9) if terminal else None,
        epoch=epoch,
        stop_reason=StopReason.MAX_EPOCHS if state == JobState.SUCCEEDED else None,
        metrics=epoch_metrics(epoch) if epoch else None,
    )


def json_response(model_or_obj, status: int = 200) -> httpx.Response:
    if isinstance(model_or_obj, list):
        body = [m.model_dump(mode="json") for m in model_or_obj]
    elif hasattr(model_or_obj, "model_dump"):
        body = model_or_obj.model_dump(mode="json")
    else:
        body = model_or_obj
    return httpx.Response(status, json=body)


def sse(kind: str, model, with_id: bool = False) -> str:
    head = f"event: {kind}\n" + (f"id: {model.epoch}\n" if with_id else "")
    return head + f"data: {model.model_dump_json()}\n\n"


def epoch_events(epochs) -> list[str]:
    return [sse("epoch", epoch_metrics(e), with_id=True) for e in epochs]


def end_event(epoch: int = 5) -> str:
    return sse("end", job_info(JobState.SUCCEEDED, epoch))


def sse_response(chunks, fail_with: Exception | None = None) -> httpx.Response:
    """A text/event-stream answer; ``fail_with`` is raised after the chunks, as a dropped connection."""

    def body():
        for chunk in chunks:
            yield chunk.encode()
        if fail_with is not None:
            raise fail_with

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


class Server:
    """A MockTransport handler: gives ``answers`` in turn (the last one from then on), records requests.

    An answer is a Response or a function of the request; streamed bodies need a function (read once)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer

    def client(self, **kwargs) -> Client:
        kwargs.setdefault("backoff", 0.0)
        return Client(URL, transport=httpx.MockTransport(self), **kwargs)


def never_called(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request expected, got {request.method} {request.url}")


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv("POLYAK_TOKEN", raising=False)


# --- requests and parsing --------------------------------------------------------------------------


def test_submit_posts_the_validated_spec_and_returns_a_job():
    server = Server(json_response(job_info(), 201))
    spec = {"name": "digits-mlp", "stopping": {"max_epochs": 5}}
    job = server.client(token="s3cret").submit(spec)

    (request,) = server.requests
    assert (request.method, request.url.path) == ("POST", "/jobs")
    assert request.headers["authorization"] == "Bearer s3cret"
    assert json.loads(request.content) == JobSpec.model_validate(spec).model_dump(mode="json")
    assert isinstance(job, Job) and job.id == JOB


def test_submit_reads_a_yaml_file(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text("name: digits-mlp\noptimizer:\n  lr: 0.05\nbatch:\n  size: 64\n")
    server = Server(json_response(job_info(), 201))
    server.client().submit(path)
    body = json.loads(server.requests[0].content)
    assert (body["optimizer"]["lr"], body["batch"]["size"]) == (0.05, 64)
    assert body["model"]["layers"] == [64, 64, 10]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"stopping": {"max_epochs": -1}}, "stopping.max_epochs"),
        ({"optimizer": {"momentum": 0.9}}, "optimizer.momentum"),
    ],
)
def test_bad_spec_fails_locally_without_a_request(spec, field):
    client = Client(URL, transport=httpx.MockTransport(never_called))
    with pytest.raises(SpecError) as e:
        client.submit(spec)
    assert field in e.value.message
    assert field in [err["field"] for err in e.value.errors]


def test_bad_spec_file_fails_locally(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  layers: [64]\n")
    client = Client(URL, transport=httpx.MockTransport(never_called))
    with pytest.raises(SpecError, match="layers"):
        client.submit(path)


def test_get_parses_job_info_and_sends_no_auth_without_token():
    server = Server(json_response(job_info(JobState.RUNNING, epoch=3)))
    info = server.client().get(JOB)
    (request,) = server.requests
    assert (request.method, request.url.path) == ("GET", f"/jobs/{JOB}")
    assert "authorization" not in request.headers
    assert info.state == JobState.RUNNING and info.metrics.epoch == 3
    assert info.metrics.criteria[0] == Criterion(name="max_epochs", value=3, threshold=5, met=False)


def test_token_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("POLYAK_TOKEN", "from-env")
    server = Server(json_response({"status": "ok"}))
    server.client().health()
    assert server.requests[0].headers["authorization"] == "Bearer from-env"


@pytest.mark.parametrize(
    ("state", "query"),
    [(None, "limit=100&offset=0"), ("queued", "state=queued&limit=100&offset=0"),
     (JobState.RUNNING, "state=running&limit=100&offset=0")],
)
def test_list_filters_by_state(state, query):
    server = Server(json_response([job_info(), job_info(JobState.RUNNING, 2, job_id="a1b2c3d4e5f6")]))
    jobs = server.client().list(state)
    (request,) = server.requests
    assert (request.method, request.url.path, request.url.query.decode()) == ("GET", "/jobs", query)
    assert [j.id for j in jobs] == [JOB, "a1b2c3d4e5f6"]


def test_list_pages_and_groups():
    server = Server(json_response([]))
    assert server.client().list(group="sweep-1", limit=5, offset=10) == []
    (request,) = server.requests
    assert request.url.query.decode() == "group=sweep-1&limit=5&offset=10"


def test_cancel_posts_and_parses():
    server = Server(json_response(job_info(JobState.CANCELLED)))
    info = server.client().cancel(JOB)
    (request,) = server.requests
    assert (request.method, request.url.path) == ("POST", f"/jobs/{JOB}/cancel")
    assert info.state == JobState.CANCELLED


def test_metrics_parses_every_epoch():
    server = Server(json_response([epoch_metrics(e) for e in range(1, 6)]))
    history = server.client().metrics(JOB)
    assert server.requests[0].url.path == f"/jobs/{JOB}/metrics"
    assert [m.epoch for m in history] == [1, 2, 3, 4, 5]
    assert history[-1].stop == StopReason.MAX_EPOCHS


def test_weights_round_trip_an_npz():
    rng = np.random.default_rng(0)
    sent = {"W1": rng.normal(size=(64, 64)).astype(np.float32), "b1": np.zeros(64, np.float32),
            "W2": rng.normal(size=(10, 64)).astype(np.float32), "b2": np.zeros(10, np.float32)}
    buf = io.BytesIO()
    np.savez(buf, **sent)
    server = Server(httpx.Response(200, content=buf.getvalue()))
    got = server.client().weights(JOB, which="best")
    (request,) = server.requests
    assert (request.url.path, request.url.params["which"]) == (f"/jobs/{JOB}/weights", "best")
    assert got.keys() == sent.keys()
    for name in sent:
        np.testing.assert_array_equal(got[name], sent[name])
        assert got[name].dtype == np.float32


def test_weights_that_are_not_an_npz_are_a_server_error():
    server = Server(httpx.Response(200, content=b"<html>proxy login</html>"))
    with pytest.raises(ServerError, match="not a readable .npz"):
        server.client().weights(JOB)


def test_health_returns_the_dict():
    status = {"status": "ok", "ray": {"connected": True, "cpus": 2}, "queue": {"queued": 1, "running": 1}}
    server = Server(json_response(status))
    assert server.client().health() == status
    assert server.requests[0].url.path == "/health"


def test_job_handle_delegates_to_the_client():
    server = Server(
        json_response(job_info(JobState.RUNNING, 2)),
        json_response([epoch_metrics(1), epoch_metrics(2)]),
        json_response(job_info(JobState.CANCELLED, 2)),
    )
    with server.client() as client:
        job = client.job(JOB)
        assert repr(job) == f"Job('{JOB}', url='{URL}')"
        assert job.info().epoch == 2
        assert len(job.metrics()) == 2
        assert job.cancel().state == JobState.CANCELLED
    paths = [r.url.path for r in server.requests]
    assert paths == [f"/jobs/{JOB}", f"/jobs/{JOB}/metrics", f"/jobs/{JOB}/cancel"]


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, Unauthorized),
        (403, Unauthorized),
        (404, JobNotFound),
        (400, SpecError),
        (422, SpecError),
        (500, ServerError),
        (503, ServerError),
        (409, JobConflict),
    ],
)
def test_error_statuses_map_to_typed_errors_with_the_server_message(status, error):
    server = Server(httpx.Response(status, json={"detail": f"the server says {status}"}))
    with pytest.raises(PolyakError) as e:
        server.client().get(JOB)
    assert type(e.value) is error
    assert e.value.message == f"the server says {status}" and str(e.value) == e.value.message
    assert e.value.status_code == status


def test_rejected_spec_carries_the_field_errors():
    errors = [{"field": "data.name", "message": "sklearn dataset must be one of digits, iris, wine"}]
    server = Server(httpx.Response(422, json={"detail": "invalid job spec: data.name", "errors": errors}))
    with pytest.raises(SpecError) as e:
        server.client().submit(JobSpec())
    assert e.value.message == "invalid job spec: data.name"
    assert e.value.errors == errors


def test_a_bad_parameter_answer_carries_its_field():
    """A bad query parameter comes in the server's one error shape, as a bad spec does."""
    errors = [{"field": "which", "message": "must be one of 'last', 'best', got 'worst'"}]
    server = Server(httpx.Response(422, json={"detail": "invalid request: which: must be one of 'last', 'best', "
                                                        "got 'worst'", "errors": errors}))
    with pytest.raises(SpecError) as e:
        server.client().weights(JOB, which="worst")
    assert e.value.errors == errors and "which: must be one of" in e.value.message


def test_unreadable_error_body_is_a_server_error():
    server = Server(httpx.Response(502, text="<html>502 Bad Gateway</html>"))
    with pytest.raises(ServerError) as e:
        server.client().get(JOB)
    assert "502" in e.value.message and "Bad Gateway" in e.value.message
    assert e.value.status_code == 502


def test_unreadable_answer_is_a_server_error():
    server = Server(httpx.Response(200, json={"id": JOB, "state": "exploded"}))
    with pytest.raises(ServerError, match="unreadable answer"):
        server.client().get(JOB)


def test_connection_refused_names_the_url():
    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    client = Client(URL, transport=httpx.MockTransport(refuse))
    with pytest.raises(ServerError) as e:
        client.list()
    assert f"cannot reach polyak server at {URL}" in e.value.message
    assert "polyak serve" in e.value.message


# --- Server-Sent Events ----------------------------------------------------------------------------


def test_parse_sse_handles_comments_ids_and_multiline_data():
    lines = [
        ": keep-alive",
        "event: epoch",
        "id: 1",
        'data: {"a":',
        "data:  1}",
        "",
        ":another comment",
        "",
        "retry: 1000",
        "data: plain",
        "",
        "event: end",
        "data: {}",
    ]
    assert list(parse_sse(lines)) == [("epoch", '{"a":\n 1}'), ("message", "plain"), ("end", "{}")]


def test_events_parse_into_models_and_pass_after():
    info = job_info(JobState.RUNNING, 0)
    chunks = [": hello\n\n", sse("state", info), *epoch_events([3, 4]), ": keep-alive\n\n", end_event(4)]
    server = Server(sse_response(chunks))
    events = list(server.client().events(JOB, after=2))
    (request,) = server.requests
    assert (request.url.path, request.url.params["after"]) == (f"/jobs/{JOB}/events", "2")
    assert [kind for kind, _ in events] == ["state", "epoch", "epoch", "end"]
    assert events[1][1] == epoch_metrics(3)
    assert events[-1][1].state == JobState.SUCCEEDED


def test_events_error_status_raises_the_typed_error():
    server = Server(httpx.Response(404, json={"detail": f"job {JOB} not found"}))
    with pytest.raises(JobNotFound, match=f"job {JOB} not found"):
        list(server.client().events(JOB))


def test_events_multiline_data_across_chunks():
    data = epoch_metrics(1).model_dump_json(indent=2).splitlines()
    event = "event: epoch\n" + "".join(f"data: {line}\n" for line in data) + "\n"
    # Split mid-line: the parser must see whole lines whatever the network chunking.
    server = Server(sse_response([event[:37], event[37:], end_event(1)]))
    kinds_epochs = [(k, getattr(m, "epoch", None)) for k, m in server.client().events(JOB)]
    assert kinds_epochs == [("epoch", 1), ("end", 1)]


# --- stream reconnects -----------------------------------------------------------------------------


def test_stream_reconnects_after_a_dropped_connection():
    drop = httpx.RemoteProtocolError("peer closed connection without sending complete message body")
    server = Server(
        sse_response(epoch_events([1, 2]), fail_with=drop),
        sse_response([*epoch_events([3, 4, 5]), end_event()]),
    )
    epochs = [m.epoch for m in server.client().job(JOB).stream()]
    assert epochs == [1, 2, 3, 4, 5]
    first, second = server.requests
    assert "after" not in first.url.params
    assert second.url.params["after"] == "2"


def test_stream_reconnects_when_the_stream_ends_without_end_and_skips_replayed_epochs():
    # The second answer replays everything, as a server that ignores `after` would.
    server = Server(
        sse_response(epoch_events([1, 2])),
        sse_response([*epoch_events([1, 2, 3, 4, 5]), end_event()]),
    )
    epochs = [m.epoch for m in server.client().job(JOB).stream()]
    assert epochs == [1, 2, 3, 4, 5]
    assert server.requests[1].url.params["after"] == "2"


def test_stream_retries_a_restarting_server_then_gets_everything():
    def refuse(request):
        raise httpx.ConnectError("Connection refused", request=request)

    server = Server(
        sse_response(epoch_events([1]), fail_with=httpx.ReadError("reset")),
        refuse,
        httpx.Response(503, json={"detail": "service starting"}),
        sse_response([*epoch_events([2, 3, 4, 5]), end_event()]),
    )
    epochs = [m.epoch for m in server.client(retries=3).job(JOB).stream()]
    assert epochs == [1, 2, 3, 4, 5]
    assert [r.url.params.get("after") for r in server.requests] == [None, "1", "1", "1"]


def test_stream_gives_up_after_bounded_retries():
    drop = httpx.RemoteProtocolError("peer closed connection")
    server = Server(lambda request: sse_response([], fail_with=drop))
    with pytest.raises(ServerError) as e:
        list(server.client(retries=2).job(JOB).stream())
    assert len(server.requests) == 3
    assert JOB in e.value.message and "peer closed connection" in e.value.message


def test_stream_does_not_retry_a_missing_job():
    server = Server(httpx.Response(404, json={"detail": f"job {JOB} not found"}))
    with pytest.raises(JobNotFound):
        list(server.client().job(JOB).stream())
    assert len(server.requests) == 1


def test_stream_backs_off_between_reconnects(monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    server = Server(lambda request: sse_response([], fail_with=httpx.ReadError("reset")))
    with pytest.raises(ServerError):
        list(server.client(retries=3, backoff=0.5).job(JOB).stream())
    assert sleeps == [0.5, 1.0, 2.0]


# --- wait ------------------------------------------------------------------------------------------


def test_wait_returns_the_final_info_from_the_end_event():
    running = sse("state", job_info(JobState.RUNNING))
    server = Server(sse_response([running, *epoch_events([1, 2]), end_event(2)]))
    info = server.client().job(JOB).wait(timeout=5)
    assert info.state == JobState.SUCCEEDED and info.stop_reason == StopReason.MAX_EPOCHS


def test_wait_falls_back_to_polling_when_the_stream_fails():
    def answer(request):
        if request.url.path.endswith("/events"):
            return httpx.Response(503, json={"detail": "event stream unavailable"})
        return json_response(job_info(JobState.SUCCEEDED, 5))

    server = Server(answer)
    info = server.client(retries=1).job(JOB).wait(timeout=5, poll=0.01)
    assert info.state == JobState.SUCCEEDED
    assert [r.url.path for r in server.requests] == [f"/jobs/{JOB}/events"] * 2 + [f"/jobs/{JOB}"]


def test_wait_times_out_on_a_quiet_stream():
    def keep_alive():
        while True:
            time.sleep(0.02)
            yield b": keep-alive\n\n"

    server = Server(lambda request: httpx.Response(200, content=keep_alive()))
    started = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        server.client().job(JOB).wait(timeout=0.3)
    assert time.monotonic() - started < 2
    assert JOB in str(e.value) and "0.3 s" in str(e.value)


def test_wait_times_out_while_polling():
    def answer(request):
        if request.url.path.endswith("/events"):
            return httpx.Response(500, json={"detail": "boom"})
        return json_response(job_info(JobState.RUNNING, 1))

    server = Server(answer)
    with pytest.raises(TimeoutError, match=f"job {JOB} did not finish within 0.2 s"):
        server.client(retries=0).job(JOB).wait(timeout=0.2, poll=0.05)


def test_stream_replaying_only_state_does_not_reconnect_forever():
    state = sse("state", job_info(JobState.RUNNING, 2))
    server = Server(lambda request: sse_response([state], fail_with=httpx.ReadError("reset")))
    with pytest.raises(ServerError, match=JOB):
        list(server.client(retries=2).job(JOB).stream())
    assert len(server.requests) == 3
