"""Limits a request cannot walk past: a job's estimated memory (422 at submit, `polyak train` refuses too, a queued
job over it fails at dispatch), the request body's size (413), and a cancel while a job is still initialising."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from test_scheduler import FakeCluster, FakeTrainer, wait_until

from polyak.contract.errors import SpecError
from polyak.contract.network import param_count
from polyak.contract.spec import parse_spec
from polyak.contract.wire import JobState, StopReason
from polyak.service.engine import memory, trainer
from polyak.service.engine.memory import check_memory, estimate
from polyak.service.server.api import create_app
from polyak.service.server.job import JobRecord, new_job_id, utcnow
from polyak.service.server.scheduler import Scheduler
from polyak.service.server.store import Store
from polyak.service.server.submission import MAX_BODY_BYTES
from polyak.workers.mlp import init_params

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
WIDE = [100000, 100000, 10]  # 1e10 parameters
DEEP = [64] + [4096] * 60 + [10]  # 9.9e8 parameters


def digits(layers: list[int]) -> dict:
    """Two workers on synthetic data that suits the layers (so that only their size is in question)."""
    return {"model": {"layers": layers},
            "data": {"source": "synthetic", "name": "classification", "n_features": layers[0],
                     "n_classes": layers[-1], "n_samples": 100},
            "cluster": {"num_workers": 2}}


def test_the_parameter_count_is_the_size_of_the_weights_the_trainer_draws():
    for layers in ([4, 16, 3], [64, 32, 32, 10], [7, 1]):
        assert param_count(layers) == init_params(layers, 1.0, np.random.default_rng(0), np, np.float64).size


@pytest.mark.parametrize("method, buffers", [("sgd", 0), ("heavy_ball", 1), ("adam", 2)])
def test_the_estimate_counts_weights_buffers_and_each_workers_batch(method, buffers):
    """The documented formula, counted by hand for 4-16-3 (131 parameters, 23 units)."""
    spec = parse_spec({"model": {"layers": [4, 16, 3]}, "optimizer": {"method": method}, "batch": {"size": 10},
                       "cluster": {"num_workers": 3, "dtype": "float64"}})
    e = estimate(spec)
    assert e.parameters == 131
    assert e.server_bytes == (5 + buffers) * 131 * 8
    assert e.batch_rows == 4  # ceil(10 / 3) rows of each sync step per worker
    assert e.worker_bytes == 2 * 131 * 8 + 3 * 4 * 23 * 8
    assert e.total == e.server_bytes + 3 * e.worker_bytes
    async_spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"mode": "async"})})
    assert estimate(async_spec).batch_rows == 10  # an async worker takes whole batches
    in_process = parse_spec({"model": {"layers": [4, 16, 3]}, "cluster": {"num_workers": 0, "dtype": "float32"}})
    assert estimate(in_process).workers == 1 and estimate(in_process).server_bytes == 6 * 131 * 4


def test_the_default_limit_is_half_the_machines_memory(monkeypatch, tmp_path):
    pages = memory.os.sysconf("SC_PAGE_SIZE") * memory.os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(memory, "CGROUP_LIMIT", tmp_path / "absent")
    assert memory.default_limit() == pages // 2
    (tmp_path / "memory.max").write_text(f"{8 * GiB}\n")
    monkeypatch.setattr(memory, "CGROUP_LIMIT", tmp_path / "memory.max")
    assert memory.default_limit() == min(pages, 8 * GiB) // 2  # a container's limit counts when lower
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.default_limit() == pages // 2


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The API over a scheduler whose limit is the default, on a machine of 16 GiB (8 GiB per job)."""
    monkeypatch.setattr(memory, "machine_memory", lambda: 16 * GiB)
    store = Store(tmp_path / "data")
    client = TestClient(create_app(Scheduler(store, FakeCluster(2), 1, train=FakeTrainer()), data_root=tmp_path),
                        base_url="http://localhost", raise_server_exceptions=False)
    yield client
    client.close()
    store.close()


@pytest.mark.parametrize("layers, estimate_text", [(WIDE, "372.9 GiB"), (DEEP, "37.2 GiB")])
def test_a_job_over_the_memory_limit_is_a_422_naming_the_estimate_and_the_limit(api, layers, estimate_text):
    r = api.post("/jobs", json=digits(layers))
    assert r.status_code == 422
    body = r.json()
    assert body["errors"][0]["field"] == "model.layers"
    assert f"needs an estimated {estimate_text}" in body["detail"]
    assert "the limit is 8.0 GiB (--max-job-memory)" in body["detail"]
    assert api.get("/jobs").json() == []  # nothing stored, nothing allocated
    assert api.post("/jobs", json=digits([64, 64, 10])).status_code == 201


def test_a_queued_job_over_a_lowered_limit_fails_at_dispatch_with_the_same_line(tmp_path):
    store = Store(tmp_path)
    spec = parse_spec(digits([64, 4096, 10]))
    job = store.add(JobRecord(id=new_job_id(), spec=spec, state=JobState.QUEUED, created_at=utcnow()))
    scheduler = Scheduler(store, FakeCluster(2), 1, train=FakeTrainer(), max_job_memory=1 << 20)
    scheduler.start()
    try:
        done = wait_until(lambda: (j := store.get(job.id)).state.is_terminal() and j)
    finally:
        scheduler.stop()
        store.close()
    with pytest.raises(SpecError) as refused:
        check_memory(spec, 1 << 20)
    assert (done.state, done.stop_reason, done.error) == (JobState.FAILED, StopReason.ERROR, refused.value.message)


def test_polyak_train_refuses_a_job_over_its_limit_with_the_same_message(tmp_path):
    spec = tmp_path / "deep.yaml"
    spec.write_text(yaml.safe_dump(digits(DEEP)))
    result = subprocess.run([sys.executable, "-m", "polyak", "train", str(spec), "-o", str(tmp_path / "w.npz"),
                             "--max-job-memory", "8G"], cwd=REPO, capture_output=True, text=True, timeout=120)
    with pytest.raises(SpecError) as refused:
        check_memory(parse_spec(digits(DEEP)), 8 * GiB)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {spec}: {refused.value.message}"]
    assert not (tmp_path / "w.npz").exists()


def test_a_body_over_the_limit_is_a_413_naming_it_before_it_is_read(api):
    big = json.dumps({**digits([64, 10]), "name": "x" * 100}).encode() + b" " * MAX_BODY_BYTES
    r = api.post("/jobs", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert f"over the limit of {MAX_BODY_BYTES} bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: refused at the chunk that passes the limit
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = api.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert (r.status_code, f"over the limit of {MAX_BODY_BYTES} bytes" in r.json()["detail"]) == (413, True)


def test_a_job_cancelled_while_its_data_is_read_ends_before_its_engine_is_built(make_spec, monkeypatch):
    cancelled = []

    def prepare(data, model, source=None):  # the data's pass, during which the job is cancelled
        cancelled.append(True)
        return real_prepare(data, model, source)

    real_prepare = trainer.prepare
    monkeypatch.setattr(trainer, "prepare", prepare)
    monkeypatch.setattr(trainer, "make_engine", lambda *a: pytest.fail("the engine was built after the cancel"))
    result = trainer.train_job(make_spec(), "t", trainer.Hooks(should_cancel=lambda: bool(cancelled)))
    assert (result.state, result.stop_reason) == (JobState.CANCELLED, StopReason.CANCELLED)
    assert result.weights.shape == (param_count([4, 16, 3]),)
