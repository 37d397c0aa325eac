"""The step channel: its frames and combining without Ray (both ends in this process, over real sockets), then
the sync engine forced onto it on one node. tests/test_multinode.py takes it across two real raylets."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import ray
from test_ray_runtime import digits_spec, train

from polyak.contract.spec import parse_spec
from polyak.service.engine.ps_core import ServerCore
from polyak.service.engine.step_channel import ChannelServer, nodes_of
from polyak.service.engine.sync_engine import SyncRayEngine
from polyak.service.engine.trainer import Hooks, initial_weights, run
from polyak.workers.data import prepare
from polyak.workers.step_channel import (
    DOWN,
    UP,
    ChannelLost,
    ChannelWorker,
    Role,
    StepFailed,
    Until,
    combine,
    recv_array,
    recv_into,
    recv_struct,
    send_frame,
)

TOKEN = b"0123456789abcdef"


# -- frames and combining ----------------------------------------------------------------------------------
def test_a_frame_arrives_byte_for_byte_however_the_kernel_splits_it():
    """A header, then arrays of several MB: sendmsg and recv_into go round many times, and each buffer lands
    whole in its own preallocated array."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal(1_000_003).astype(np.float32)  # 4 MB: more than a socket's buffer
    rows = rng.integers(0, 10**9, size=300_001)
    a, b = socket.socketpair()
    sender = threading.Thread(target=send_frame, args=(a, [DOWN.pack(7, 1), np.array([rows.size]), W, rows],
                                                       Until.after(30)))
    sender.start()
    until = Until.after(30)
    assert recv_struct(b, DOWN, until) == (7, 1)
    (count,) = recv_array(b, 1, np.int64, until)
    W_in = np.empty_like(W)
    recv_into(b, W_in, until)
    rows_in = recv_array(b, count, np.int64, until)
    sender.join()
    np.testing.assert_array_equal(W_in, W)
    np.testing.assert_array_equal(rows_in, rows)
    a.close()
    with pytest.raises(ChannelLost, match="the peer closed the connection"):
        recv_struct(b, UP, until)


def test_a_wait_ends_at_its_deadline_or_its_stop_flag():
    a, b = socket.socketpair()
    with pytest.raises(ChannelLost, match="no answer in time"):
        recv_struct(b, UP, Until.after(0.2))
    stop = threading.Event()
    stop.set()
    with pytest.raises(ChannelLost, match="the channel was closed"):
        recv_struct(b, UP, Until(stop=stop))
    a.close(), b.close()


def test_one_combined_part_is_the_step_the_server_takes_from_the_k_parts():
    """A node's sum, applied as one part, gives bit for bit the server's step of its workers' K parts (a part
    without rows included): the channel's step on one node is the compiled graph's."""
    spec = parse_spec({"model": {"layers": [3, 4, 2]}, "optimizer": {"method": "heavy_ball", "lr": 0.3},
                       "cluster": {"dtype": "float64"}})
    rng = np.random.default_rng(1)
    p = 3 * 4 + 4 + 4 * 2 + 2
    W0 = rng.standard_normal(p)
    parts = [(rng.standard_normal(p) * 10.0 ** rng.integers(-3, 3), float(rng.random()), int(rng.integers(1, 50)))
             for _ in range(3)]
    parts.insert(1, (np.zeros(p), 0.0, 0))
    combined = combine(parts, np.empty(p))
    np.testing.assert_array_equal(combined[0], ((parts[0][0] + parts[2][0]) + parts[3][0]))
    assert combined[1:] == (sum(q[1] for q in parts), sum(q[2] for q in parts))
    by_parts, by_node = ServerCore(spec, W0), ServerCore(spec, W0)
    for _ in range(3):
        by_parts.apply_parts(parts)
        by_node.apply_parts([combined])
    np.testing.assert_array_equal(by_node.state.W, by_parts.state.W)
    assert by_node.step_losses == by_parts.step_losses


def test_nodes_are_ordered_by_their_first_worker():
    assert nodes_of(["b", "a", "b", "c", "a"]) == [[0, 2], [1, 4], [3]]


# -- both ends in this process -----------------------------------------------------------------------------
def fake_gradient(W: np.ndarray, rows: np.ndarray):
    """A gradient sum that depends on every byte of W and of the rows, as a real one does."""
    return W * len(rows) + np.sin(rows.sum()) + np.arange(W.size), float(np.cos(rows).sum()), len(rows)


class Channel:
    """Shards (each a ChannelServer) and workers on nodes, wired as the engine wires them."""

    def __init__(self, worker_nodes: list[str], bounds: list[int], compute=fake_gradient, dtype=np.float64):
        self.nodes, self.bounds = nodes_of(worker_nodes), bounds
        self.servers = [ChannelServer("127.0.0.1") for _ in bounds[1:]]
        addresses = tuple(s.address for s in self.servers)
        self.workers: dict[int, ChannelWorker] = {}
        for j, ks in enumerate(self.nodes):
            role = Role(TOKEN, j, followers=len(ks) - 1, servers=addresses, bounds=tuple(bounds))
            leader = self.workers[ks[0]] = ChannelWorker(role, bounds[-1], dtype, compute, f"worker {ks[0] + 1}")
            for i, k in enumerate(ks[1:], start=1):
                role = Role(TOKEN, j, position=i, leader=("127.0.0.1", leader.port))
                self.workers[k] = ChannelWorker(role, bounds[-1], dtype, compute, f"worker {k + 1}")
        accepting = [threading.Thread(target=s.accept, args=(self.nodes, [f"n{j}" for j in range(len(self.nodes))],
                                                             TOKEN, hi - lo, dtype, 30))
                     for s, lo, hi in zip(self.servers, bounds[:-1], bounds[1:], strict=True)]
        for t in accepting:
            t.start()
        for t in accepting:
            t.join()

    def step(self, W: np.ndarray, rows: list[np.ndarray], timeout: float = 30) -> list[list[tuple]]:
        """Each shard's node parts; the shards exchange at the same time, as their actors do."""
        out: list = [None] * len(self.servers)

        def exchange(s: int) -> None:
            try:
                out[s] = self.servers[s].exchange(W[self.bounds[s] : self.bounds[s + 1]], rows, timeout)
            except Exception as e:  # noqa: BLE001 - handed to the test's thread below
                out[s] = e

        threads = [threading.Thread(target=exchange, args=(s,)) for s in range(len(self.servers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for result in out:
            if isinstance(result, Exception):
                raise result
        return [[(g.copy(), loss, count) for g, loss, count in parts] for parts in out]

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for worker in self.workers.values():
            worker.close()


@pytest.fixture
def channels():
    made = []

    def make(*args, **kwargs) -> Channel:
        made.append(Channel(*args, **kwargs))
        return made[-1]

    yield make
    for channel in made:
        channel.close()


def test_two_nodes_and_two_shards_get_one_part_per_node_summed_in_worker_order(channels):
    """Workers 1 and 3 on node a (1 leads), 2 on node b; W split 7 | 13 over two shards. Each shard gets, per
    node, its slice of the sum of that node's workers' gradients at the whole W, step after step."""
    channel = channels(["a", "b", "a"], [0, 7, 20])
    rng = np.random.default_rng(2)
    for step in range(4):
        W = rng.standard_normal(20)
        rows = [rng.integers(0, 100, size=n) for n in (5, 3, 0 if step == 2 else 4)]  # an empty part in step 2
        got = channel.step(W, rows)
        for j, ks in enumerate(channel.nodes):
            parts = [fake_gradient(W, rows[k]) for k in ks]
            want = parts[0][0].copy()
            for g, _, _ in parts[1:]:
                want += g
            for s, (lo, hi) in enumerate(zip(channel.bounds[:-1], channel.bounds[1:], strict=True)):
                g, loss, count = got[s][j]
                np.testing.assert_array_equal(g, want[lo:hi])
                assert loss == sum(p[1] for p in parts) and count == sum(p[2] for p in parts)


def test_a_worker_that_dies_ends_the_step_at_once_naming_its_node(channels):
    channel = channels(["a", "a", "b"], [0, 6])
    W, rows = np.ones(6), [np.arange(3)] * 3
    channel.step(W, rows)
    channel.workers[1].close()  # node a's follower: its leader sees the connection close and closes its own
    with pytest.raises(ChannelLost, match=r"the step channel lost node n0: the peer closed the connection"):
        channel.step(W, rows, timeout=600)  # long: the loss is noticed by the closed socket, not the deadline
    with pytest.raises(ChannelLost, match="the step channel is closed"):
        channel.step(W, rows)


def test_a_worker_that_does_not_answer_times_out_naming_its_node(channels):
    release = threading.Event()

    def stuck(W, rows):
        release.wait(30)
        return fake_gradient(W, rows)

    channel = channels(["a", "b"], [0, 4], compute=stuck)
    try:
        with pytest.raises(ChannelLost, match=r"the step channel lost node n0: no answer in time"):
            channel.step(np.ones(4), [np.arange(2)] * 2, timeout=0.5)
    finally:
        release.set()


def test_a_gradient_error_fails_the_step_with_the_workers_message(channels):
    def failing(W, rows):
        if len(rows) == 2:
            raise ValueError("rows out of range")
        return fake_gradient(W, rows)

    channel = channels(["a", "a"], [0, 4], compute=failing)
    with pytest.raises(StepFailed, match=r"^worker 2: ValueError: rows out of range$"):
        channel.step(np.ones(4), [np.arange(3), np.arange(2)])


def test_a_stranger_or_a_wrong_token_is_not_let_in():
    server = ChannelServer("127.0.0.1")
    stranger = socket.create_connection(server.address)
    stranger.sendall(b"x" * 24)  # as long as a hello, and none
    wrong = ChannelWorker(Role(b"x" * 16, 0, servers=(server.address,), bounds=(0, 3)), 3, np.float64,
                          fake_gradient, "intruder")
    right = ChannelWorker(Role(TOKEN, 0, servers=(server.address,), bounds=(0, 3)), 3, np.float64,
                          fake_gradient, "worker 1")
    try:
        server.accept([[0]], ["n0"], TOKEN, 3, np.float64, timeout=30)
        assert stranger.recv(1) == b""  # closed on it
        ((g, loss, count),) = server.exchange(np.ones(3), [np.arange(2)], 30)
        np.testing.assert_array_equal(g, fake_gradient(np.ones(3), np.arange(2))[0])
    finally:
        server.close()
        stranger.close()
        wrong.close()
        right.close()
    assert not right.thread.is_alive() and not wrong.thread.is_alive()


def test_a_channel_not_built_in_time_says_which_nodes_it_waited_for():
    server = ChannelServer("127.0.0.1")
    with pytest.raises(ChannelLost, match=r"not built within 0 s: not every node's leader connected \(nodes n0, n1"):
        server.accept([[0], [1]], ["n0", "n1"], TOKEN, 3, np.float64, timeout=0.3)
    server.close()


# -- the sync engine on the channel, forced on one node ---------------------------------------------------------
@pytest.mark.usefixtures("ray_session")
def test_the_channel_takes_the_compiled_graphs_steps_through_lost_workers_and_a_lost_server(tmp_path):
    """One node, two workers: worker 1 leads, worker 2 follows over loopback. The follower dies in epoch 1, the
    leader in epoch 2 (each time the step fails at once, the channel is built again and the steps not applied
    are redone), the server in epoch 3 (restored from epoch 2's checkpoint): the weights are still bit for bit
    the compiled graph's, undisturbed, and the in-process loop's to 1e-10."""
    spec = digits_spec(**{"stopping.max_epochs": 4})  # 15 steps an epoch
    info = prepare(spec.data, spec.model)
    compiled = SyncRayEngine(spec, info, initial_weights(spec), sync_path="compiled")
    try:
        assert compiled.graph is not None
        undisturbed = run(spec, info, compiled, "t")
    finally:
        compiled.close()
    engine = SyncRayEngine(spec, info, initial_weights(spec), sync_path="channel")
    targets = {8: lambda: engine.workers[1], 23: lambda: engine.workers[0], 40: lambda: engine.ps}
    calls, pids = {"n": 0}, {}

    def should_cancel():
        calls["n"] += 1
        if calls["n"] in targets:
            actor = targets[calls["n"]]()
            pids[calls["n"]] = ray.get(actor.pid.remote())
            ray.kill(actor, no_restart=False)
        return False

    try:
        assert engine.sync_path == "channel" and engine.graph is None and engine.channel_open
        assert engine.describe().endswith("sync steps over channel: chosen by the caller"), engine.describe()
        incarnation = engine.incarnation
        disturbed = run(spec, info, engine, "t", Hooks(should_cancel=should_cancel, job_dir=tmp_path))
        after = {at: ray.get(target().pid.remote()) for at, target in targets.items()}
    finally:
        engine.close()
    assert all(after[at] != pids[at] for at in targets)  # every kill landed: a new process holds its part
    assert engine.worker_restarts == 2 and engine.server_recoveries == 1 and engine.incarnation != incarnation
    assert [m.epoch for m in disturbed.metrics] == [1, 2, 3, 4]
    np.testing.assert_array_equal(disturbed.weights, undisturbed.weights)
    assert [m.train_loss for m in disturbed.metrics] == [m.train_loss for m in undisturbed.metrics]
    local = train(digits_spec(**{"stopping.max_epochs": 4, "cluster.num_workers": 0}))
    np.testing.assert_allclose(disturbed.weights, local.weights, rtol=0, atol=1e-10)
