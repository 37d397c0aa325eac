"""The step channel, worker side: a sync step across nodes over plain TCP sockets between the actors.

The parameter server (one or several shards, each owning W[bounds[s]:bounds[s+1]]) listens on its node's
address; on each node the first worker is the node's leader and connects to every shard; the node's other
workers (its followers) connect to their leader over loopback. A step then travels

    shard s -> leader: W[bounds[s]:bounds[s+1]] and the node's rows   leader -> follower: W, its rows
    each worker: its gradient sum                                      follower -> leader: its part
    leader -> shard s: slice s of the node's summed part (the parts added in a fixed order)

so W crosses the network once per node and a step, and one part per node comes back: nothing passes
through the driver, which only paces the steps (service/engine/step_channel.py is the server side).

Frames are a small fixed header and raw array bytes (no pickle), received into preallocated buffers. A wait
ends at a deadline (the server's bound on a step) or, in a worker's thread, when its stop flag is set, checked
every TICK seconds; a peer that died closes its sockets, which ends the waits on it at once (ChannelLost).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

HELLO = struct.Struct("<16sq")  # the channel's token, the sender's index: a leader's node, a follower's position - 1
DOWN = struct.Struct("<qq")  # step number, k: then k int64 row counts, the W bytes, the rows (int64) one after another
UP = struct.Struct("<qdqq")  # step number, loss sum, count, error length: then the error (utf-8) or the gradient sum
TICK = 1.0  # a worker's thread looks at its stop flag this often while it waits
CONNECT_SECONDS = 60.0  # building the channel: connections and hellos
HELLO_SECONDS = 5.0  # a connection that says nothing for this long is no peer of ours
TOKEN_BYTES = 16


class ChannelLost(ConnectionError):
    """A peer of the step channel closed its socket, did not answer in time, or answered out of step: the
    step did not happen and the channel is gone (the engine repairs it as it does a lost actor)."""


class StepFailed(RuntimeError):
    """A worker's gradient call raised: an error of the job, not of the channel (re-running would fail again)."""


@dataclass(frozen=True)
class Role:
    """A worker's place in the channel: node ``node``'s leader (position 0) or its follower number ``position``."""

    token: bytes
    node: int
    position: int = 0
    followers: int = 0  # a leader: how many followers connect to it
    servers: tuple[tuple[str, int], ...] = ()  # a leader: each shard's address, in shard order
    bounds: tuple[int, ...] = ()  # a leader: shard s owns W[bounds[s]:bounds[s+1]]
    leader: tuple[str, int] | None = None  # a follower: its leader's loopback address

    @property
    def is_leader(self) -> bool:
        return self.position == 0


# -- waiting, sending, receiving -------------------------------------------------------------------------
class Until:
    """When a wait on the channel gives up: at ``deadline`` (time.monotonic()) or once ``stop`` is set."""

    def __init__(self, deadline: float | None = None, stop: threading.Event | None = None):
        self.deadline, self.stop = deadline, stop

    @classmethod
    def after(cls, seconds: float) -> Until:
        return cls(time.monotonic() + seconds)

    def timeout(self) -> float:
        """Seconds the next blocking call may take; raises ChannelLost when the wait is over."""
        if self.stop is not None and self.stop.is_set():
            raise ChannelLost("the channel was closed")
        if self.deadline is None:
            return TICK
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ChannelLost("no answer in time")
        return min(left, TICK)


def recv_into(sock: socket.socket, buf, until: Until) -> None:
    """Fill ``buf`` (any contiguous buffer) from ``sock``."""
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        sock.settimeout(until.timeout())
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            continue  # until.timeout() decides whether to go on waiting
        if n == 0:
            raise ChannelLost("the peer closed the connection")
        got += n


def recv_struct(sock: socket.socket, shape: struct.Struct, until: Until) -> tuple:
    buf = bytearray(shape.size)
    recv_into(sock, buf, until)
    return shape.unpack(buf)


def recv_array(sock: socket.socket, n: int, dtype, until: Until) -> np.ndarray:
    out = np.empty(n, dtype=dtype)
    recv_into(sock, out, until)
    return out


def send_frame(sock: socket.socket, buffers: list, until: Until) -> None:
    """Send the buffers back to back, each from its own memory (scatter-gather, no joined copy)."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    while views:
        sock.settimeout(until.timeout())
        try:
            sent = sock.sendmsg(views)
        except TimeoutError:
            continue
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def tune(sock: socket.socket) -> socket.socket:
    """No Nagle delay on the small headers; keepalive probes so that a peer whose host vanished (no reset
    ever comes) is noticed in seconds."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, name):  # Linux names; elsewhere the system's keepalive defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


def accept_hellos(listener: socket.socket, count: int, token: bytes, until: Until) -> list[socket.socket]:
    """``count`` connections that said hello with ``token``, ordered by the index each gave. A connection
    that says nothing within HELLO_SECONDS, a wrong token, or an index out of range or taken is dropped."""
    links: list[socket.socket | None] = [None] * count
    while None in links:
        listener.settimeout(until.timeout())
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        try:
            said, index = recv_struct(conn, HELLO, Until(time.monotonic() + HELLO_SECONDS, until.stop))
        except (ChannelLost, OSError):
            said, index = b"", -1
        if said != token or not 0 <= index < count or links[index] is not None:
            conn.close()
            continue
        links[index] = tune(conn)
    return links


def connect(address: tuple[str, int], token: bytes, index: int, until: Until) -> socket.socket:
    """A connection to ``address`` that has said hello; ``until`` must have a deadline."""
    sock = socket.create_connection(address, timeout=max(until.deadline - time.monotonic(), 0.001))
    send_frame(tune(sock), [HELLO.pack(token, index)], until)
    return sock


def send_error(sock: socket.socket, step: int, message: str, until: Until) -> None:
    text = message.encode()
    send_frame(sock, [UP.pack(step, 0.0, 0, len(text)), text], until)


def recv_part(sock: socket.socket, step: int, out: np.ndarray, until: Until) -> tuple[np.ndarray, float, int]:
    """One gradient part (sum into ``out``, loss sum, count) of step ``step``; a worker's error is StepFailed."""
    got, loss_sum, count, error = recv_struct(sock, UP, until)
    if error:
        raise StepFailed(bytes(recv_array(sock, error, np.uint8, until)).decode(errors="replace"))
    if got != step:
        raise ChannelLost(f"a part of step {got} came in step {step}")
    recv_into(sock, out, until)
    return out, loss_sum, count


def combine(parts: list[tuple[np.ndarray, float, int]], out: np.ndarray) -> tuple[np.ndarray, float, int]:
    """The parts' sum, added in the given order into ``out``: the same additions, in the same order, as the
    parameter server makes of the same parts (ServerCore.apply_parts), so one node's sum is that step's.
    A part without rows is zeros and adds nothing. A node of one worker: its own part, uncopied."""
    if len(parts) == 1:
        return parts[0]
    np.copyto(out, parts[0][0])
    loss_sum, count = parts[0][1], parts[0][2]
    for grad, part_loss, part_count in parts[1:]:
        out += grad
        loss_sum += part_loss
        count += part_count
    return out, loss_sum, count


# -- a worker's end -----------------------------------------------------------------------------------------
Compute = Callable[[np.ndarray, np.ndarray], tuple]  # (W, rows) -> (gradient sum, loss sum, count)


class ChannelWorker:
    """One gradient worker's end of the channel, served by its own thread inside the worker actor: the
    actor's ordinary calls (evaluate, ping) stay free while it waits for steps."""

    def __init__(self, role: Role, num_params: int, dtype, compute: Compute, name: str):
        self.role, self.compute, self.name = role, compute, name
        self.W = np.empty(num_params, dtype=dtype)  # each step's W is received into this buffer
        self.sum = np.empty(num_params, dtype=dtype) if role.is_leader else None
        self.parts = [np.empty(num_params, dtype=dtype) for _ in range(role.followers)]
        self.stop = threading.Event()
        self.until = Until(stop=self.stop)
        self.listener = None
        if role.followers:  # bound now, so its port can be handed to the followers before they start
            self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._run, name=f"step channel of {name}", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int | None:
        return self.listener.getsockname()[1] if self.listener else None

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread (within a TICK of its current wait, or after its gradient call) and its sockets."""
        self.stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the step channel of {self.name} did not stop within {timeout:.0f} s")

    def _run(self) -> None:
        links: list[socket.socket] = []  # every socket of this end, closed when it ends
        try:
            setup = Until(time.monotonic() + CONNECT_SECONDS, self.stop)
            if not self.role.is_leader:
                links.append(connect(self.role.leader, self.role.token, self.role.position - 1, setup))  # 0-based
                while True:
                    self._follow(links[0])
            if self.listener is not None:  # the followers first: a leader that reached its servers is ready
                links += accept_hellos(self.listener, self.role.followers, self.role.token, setup)
            followers = list(links)
            for address in self.role.servers:
                links.append(connect(address, self.role.token, self.role.node, setup))
            while True:
                self._lead(links[len(followers):], followers)
        except (ChannelLost, StepFailed, OSError) as e:  # this end's end: closed, replaced, broken or failed
            log.info("step channel of %s ended: %s", self.name, e)
        finally:
            for sock in links:
                sock.close()
            if self.listener is not None:
                self.listener.close()

    def _receive_step(self, servers: list[socket.socket]) -> tuple[int, np.ndarray, np.ndarray]:
        """(step, row counts of the node's workers, their rows one after another), W into self.W."""
        bounds, step = self.role.bounds, None
        for s, sock in enumerate(servers):
            got, k = recv_struct(sock, DOWN, self.until)
            counts = recv_array(sock, k, np.int64, self.until)
            recv_into(sock, self.W[bounds[s] : bounds[s + 1]], self.until)
            rows = recv_array(sock, int(counts.sum()), np.int64, self.until)  # every shard sends the same rows
            if step is not None and got != step:
                raise ChannelLost(f"shard {s + 1} sent step {got} while shard 1 sent step {step}")
            step = got
        return step, counts, rows

    def _lead(self, servers: list[socket.socket], followers: list[socket.socket]) -> None:
        """One step as the node's leader: W and rows out to the followers, the node's summed part back."""
        step, counts, rows = self._receive_step(servers)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for i, sock in enumerate(followers, start=1):
            send_frame(sock, [DOWN.pack(step, 1), counts[i : i + 1], self.W, rows[starts[i] : starts[i + 1]]],
                       self.until)
        try:
            own = self.compute(self.W, rows[: starts[1]])
        except Exception as e:
            self._fail(servers, step, f"{self.name}: {type(e).__name__}: {e}")
        try:
            theirs = [recv_part(sock, step, out, self.until) for sock, out in zip(followers, self.parts, strict=True)]
        except StepFailed as e:
            self._fail(servers, step, str(e))
        total, loss_sum, count = combine([own, *theirs], self.sum)
        bounds = self.role.bounds
        for s, sock in enumerate(servers):
            send_frame(sock, [UP.pack(step, loss_sum, count, 0), total[bounds[s] : bounds[s + 1]]], self.until)

    def _follow(self, up: socket.socket) -> None:
        """One step as a follower: W and rows from the leader, the gradient sum back to it."""
        step, _ = recv_struct(up, DOWN, self.until)
        counts = recv_array(up, 1, np.int64, self.until)
        recv_into(up, self.W, self.until)
        rows = recv_array(up, int(counts[0]), np.int64, self.until)
        try:
            grad, loss_sum, count = self.compute(self.W, rows)
        except Exception as e:
            self._fail([up], step, f"{self.name}: {type(e).__name__}: {e}")
        send_frame(up, [UP.pack(step, loss_sum, count, 0), np.ascontiguousarray(grad)], self.until)

    def _fail(self, upstream: list[socket.socket], step: int, message: str) -> None:
        """A gradient call raised: its error goes up in place of the part (the server fails the step with it),
        and this end of the channel closes."""
        for sock in upstream:
            send_error(sock, step, message, self.until)
        raise StepFailed(message)
