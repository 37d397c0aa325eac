"""polyak on a real multi-node Ray cluster: two raylets on loopback, each in its own process group.

The head has 1 CPU and the second node 2, so a two-worker job has a worker on each node and its sync
steps take the step channel (a compiled graph only runs where every actor shares the driver's
node). Drivers run as subprocesses (`polyak train --ray-address`), as a user runs them: this test
process keeps its own local Ray session for the other tests. Killing the second node's process group
is a whole node lost mid-epoch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_cluster import BIN, REPO, _processes_with, _ray_env, free_port_range, free_ports, metrics_of, port_open

from polyak.contract.spec import parse_spec
from polyak.service.engine.trainer import train_job

pytestmark = pytest.mark.slow

DIGITS = {
    "name": "digits-two-nodes",
    "model": {"layers": [64, 32, 10], "seed": 3},
    "data": {"source": "sklearn", "name": "digits", "validation_fraction": 0.2, "standardize": True},
    "optimizer": {"method": "heavy_ball", "lr": 0.5, "alpha": 0.2},
    "batch": {"size": 100},
    "stopping": {"max_epochs": 3},
    "cluster": {"num_workers": 2, "device": "cpu", "dtype": "float64"},
}


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """The whole node at once: its raylet, object store, agents and workers (one process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class TwoNodes:
    head: Node
    second: Node
    temp_dir: Path
    gcs_port: int
    env: dict

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def tails(self) -> str:
        return f"--- head ---\n{self.head.tail()}\n--- second ---\n{self.second.tail()}"


def _ports_args(temp_dir: Path) -> list[str]:
    """Every port a raylet opens, chosen free here, so that it never meets another Ray on this machine."""
    agent_listen, agent_grpc, runtime_env_agent, metrics, object_manager, node_manager = ports = free_ports(6)
    low, high = free_port_range(48, set(ports))
    return [
        "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
        "--object-manager-port", str(object_manager), "--node-manager-port", str(node_manager),
        "--min-worker-port", str(low), "--max-worker-port", str(high),
    ]


def _start(command: list[str], env: dict, log: Path) -> Node:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(proc, log)


def _ray(address: str, env: dict, code: str, timeout: float = 60) -> str:
    """Run ``code`` in a driver connected to the cluster; its stdout."""
    proc = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r}); {code}"],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def two_nodes():
    temp_dir = Path(tempfile.mkdtemp(prefix="polyak-2n-", dir="/tmp"))  # Ray's socket paths must stay short
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = _ray_env(token_file)
    # A lost node is noticed within seconds, not Ray's default half a minute.
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3")
    (gcs,) = free_ports(1)
    ray = str(BIN / "ray")
    common = ["--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--num-gpus", "0",
              "--object-store-memory", str(200 * 2**20)]
    head = _start([ray, "start", "--head", "--port", str(gcs), "--include-dashboard", "false", "--num-cpus", "1",
                   "--temp-dir", str(temp_dir), *common, *_ports_args(temp_dir)], env, temp_dir / "head.log")
    cluster = TwoNodes(head, None, temp_dir, gcs, env)
    try:
        deadline = time.monotonic() + 90
        while not port_open(gcs):
            assert head.proc.poll() is None, head.tail()
            assert time.monotonic() < deadline, head.tail()
            time.sleep(0.5)
        cluster.second = _start([ray, "start", "--address", cluster.address, "--num-cpus", "2", *common,
                                 *_ports_args(temp_dir)], env, temp_dir / "second.log")
        deadline = time.monotonic() + 120
        while True:
            assert cluster.second.proc.poll() is None, cluster.tails()
            alive = _ray(cluster.address, env, "print(sum(n['Alive'] for n in ray.nodes()))")
            if int(alive.strip().splitlines()[-1]) == 2:
                break
            assert time.monotonic() < deadline, cluster.tails()
            time.sleep(1)
        yield cluster
    finally:
        for node in (cluster.second, head):
            if node is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # `--block` stops what it started, then exits
                try:
                    node.proc.wait(60)
                except subprocess.TimeoutExpired:
                    node.kill()
        deadline = time.monotonic() + 15
        while (left := _processes_with(str(token_file))) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def train_on(cluster: TwoNodes, spec: dict, tmp_path: Path, timeout: float = 300, **popen):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = [sys.executable, "-m", "polyak", "train", str(path), "--ray-address", cluster.address, "--json",
            "-o", str(tmp_path / "w.npz"), "--job-dir", str(tmp_path / "job")]
    return subprocess.run(args, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout)


def weights_of(path: Path, spec) -> np.ndarray:
    from polyak.contract.network import from_dict
    from polyak.service.engine.checkpoint import load_npz

    return from_dict(load_npz(path), spec.model.layers, np.float64)


def test_sync_across_two_nodes_equals_the_in_process_loop(two_nodes, tmp_path):
    proc = train_on(two_nodes, DIGITS, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + two_nodes.tails()
    lines = proc.stderr.splitlines()
    assert lines[0] == f"joining the Ray cluster at {two_nodes.address} ..."
    assert lines[1].startswith("joined the Ray cluster at ") and "2 node(s), 3 CPU(s)" in lines[1]
    placement = lines[2]
    assert placement.startswith("running sync on Ray, 2 cpu worker(s)")
    assert "sync steps over channel: one part per node over TCP; the job spans 2 nodes" in placement, placement
    assert "Traceback" not in proc.stderr
    streamed = metrics_of(proc.stdout)
    assert [m.epoch for m in streamed] == [1, 2, 3]

    spec = parse_spec({**DIGITS, "cluster": {**DIGITS["cluster"], "num_workers": 0}})
    local = train_job(spec)
    np.testing.assert_allclose(weights_of(tmp_path / "w.npz", spec), local.weights, rtol=0, atol=1e-10)
    for remote, here in zip(streamed, local.metrics, strict=True):
        assert remote.train_loss == pytest.approx(here.train_loss, abs=1e-10)
        assert remote.val_loss == pytest.approx(here.val_loss, abs=1e-10)


def test_async_trains_across_two_nodes(two_nodes, tmp_path):
    spec = {**DIGITS, "cluster": {**DIGITS["cluster"], "mode": "async"}, "batch": {"size": 50},
            "stopping": {"max_epochs": 6}}
    proc = train_on(two_nodes, spec, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + two_nodes.tails()
    assert "running async on Ray" in proc.stderr
    # The head has one CPU for two workers: one of them at least runs on the second node, whichever Ray put there.
    assert on_second_node(proc.stderr), proc.stderr[-3000:]
    streamed = metrics_of(proc.stdout)
    assert len(streamed) == 6 and streamed[-1].val_accuracy >= 0.9
    assert streamed[-1].staleness_max is not None


def on_second_node(stderr: str) -> tuple[str, list[str]] | None:
    """(node id, worker numbers) of the workers the job's placement line puts on a node other than the driver's
    (the head's); None if it puts none there. Nodes are told apart by the driver's mark, not by IP: both raylets
    run on this machine."""
    found = re.search(r"workers? ([\d,]+) on (\w{8}) \([^,)]*\)", stderr)
    return (found.group(2), found.group(1).split(",")) if found else None


# Last in the module: it takes the second node down for good.
def test_a_lost_node_fails_the_job_in_bounded_time_and_the_head_goes_on(two_nodes, tmp_path):
    spec = {**DIGITS, "batch": {"size": 20}, "stopping": {"max_epochs": 10_000}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = [sys.executable, "-m", "polyak", "train", str(path), "--ray-address", two_nodes.address, "--json",
            "-o", str(tmp_path / "w.npz"), "--job-dir", str(tmp_path / "job")]
    with (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen(args, cwd=REPO, env=two_nodes.env, stdout=subprocess.PIPE, stderr=err, text=True)
        streamed = []
        for line in proc.stdout:  # two whole epochs, so there is a checkpoint; then the node goes mid-epoch
            streamed.append(json.loads(line))
            if len(streamed) == 2:
                break
        time.sleep(0.1)
        two_nodes.second.kill()
        killed = time.monotonic()
        try:
            rest, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the job hung after its node was lost:\n" + (tmp_path / "err.txt").read_text()[-3000:])
    took = time.monotonic() - killed
    stderr = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    error = stderr.strip().splitlines()[-1]
    # Workers ask for the driver's node (the head, 1 CPU) first and spill to the second: which of them got the head
    # depends on the order Ray placed them, so the job's own placement line says which ones the lost node held.
    lost_node, stranded = on_second_node(stderr)
    assert error.startswith(f"error: node {lost_node} ("), error
    assert f"was lost with gradient worker(s) {', '.join(stranded)} of 2;" in error, error
    free = 1 - (2 - len(stranded))  # the head's one CPU, less the workers it holds
    assert f"the cluster has {free} CPU(s) free and they need {len(stranded)}" in error, error
    epochs = len(streamed) + len(metrics_of(rest))
    assert f"weights and checkpoint of epoch {epochs} kept" in error, error
    assert took < 60, f"{took:.0f} s to notice the lost node"
    # The last finished epoch's weights were written; the checkpoint is there to resume from.
    assert (tmp_path / "w.npz").exists() and (tmp_path / "job" / "checkpoint.npz").exists()

    assert two_nodes.head.proc.poll() is None, two_nodes.head.tail()  # the head's raylet is alive
    one = {**DIGITS, "cluster": {**DIGITS["cluster"], "num_workers": 1}, "stopping": {"max_epochs": 2}}
    after = train_on(two_nodes, one, tmp_path / "after")
    assert after.returncode == 0, after.stderr[-3000:]
    assert len(metrics_of(after.stdout)) == 2
