"""The API against its own OpenAPI schema: schemathesis generates requests for every operation of /openapi.json
(in this process, over ASGI: no server, no Ray) and checks that none is answered with a 5xx, that every status,
content type and body is one the schema publishes.

Three servers: open (no token), with a token and sent it, with a token and not sent it (every guarded route a 401).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi
from test_scheduler import FakeCluster, FakeTrainer

from polyak.service.server.api import create_app
from polyak.service.server.guard import LOOPBACK_HOSTS
from polyak.service.server.scheduler import Scheduler
from polyak.service.server.store import Store

TOKEN = "fuzz-secret"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# (the server's token, the token sent)
SERVERS = {"open": (None, None), "token": (TOKEN, TOKEN), "no-token": (TOKEN, None)}
# POST /datasets takes raw bytes in these types: sent as generated, as schemathesis sends octet-stream.
schemathesis.serializer.alias(["application/x-npy", "application/vnd.apache.parquet"], "application/octet-stream")


class StandInCluster(FakeCluster):
    """test_scheduler's stand-in, with the ``shutdown`` the app's lifespan calls (schemathesis runs it)."""

    def shutdown(self) -> None:
        pass


@pytest.fixture
def make_schema(tmp_path):
    """The app as tests/test_api.py builds it (a stand-in cluster, no Ray), answering schemathesis' Host, and its
    schema as schemathesis reads it from /openapi.json."""
    stores: list[Store] = []

    def make(token: str | None):
        stores.append(Store(tmp_path / f"data-{len(stores)}"))
        app = create_app(Scheduler(stores[-1], StandInCluster(2), 1, train=FakeTrainer()), token=token,
                         data_root=tmp_path, allowed_hosts=(*LOOPBACK_HOSTS, asgi.HOST))
        return schemathesis.openapi.from_asgi("/openapi.json", app)

    yield make
    asgi.shutdown_lifespans()  # schemathesis started the apps' (their schedulers) and would keep them to the end
    for store in stores:
        store.close()


def fuzz(operation, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    call()


@pytest.mark.parametrize("server", list(SERVERS))
def test_every_operation_keeps_to_the_schema(make_schema, server):
    token, sent = SERVERS[server]
    schema = make_schema(token)
    headers = {} if sent is None else {"Authorization": f"Bearer {sent}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 13  # every route of the JSON API: none was left out of the schema
    failures = []
    for operation in operations:
        try:
            fuzz(operation, headers)
        except Exception as e:  # every operation's failure, not only the first one's
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
