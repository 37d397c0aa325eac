"""The step channel, server side: a parameter server's (or shard's) end, and the plan of who connects to whom.

Across nodes a sync step is one actor call to each server, ``channel_step(rows)``, from the driver, which keeps
a few in flight to pace the steps. The server sends its W (its slice of it, when W is sharded) and each
node's rows to that node's leader, receives one part per node, and sums the parts in node order into the same
ServerCore step as every other path. The worker side and the frames are workers/step_channel.py's.

Nothing here waits without a bound: every send and receive of a step ends at the deadline the engine gives
(derived from the measured step time), and a leader that died (its process or its node) closes its socket,
which ends the step at once. Either way the step is not applied and the channel is closed (ChannelLost): the
engine treats that as a lost actor, waits for the actors, builds a new channel and redoes the steps.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import numpy as np

from polyak.service.engine.placement import by_node
from polyak.workers.step_channel import (
    DOWN,
    ChannelLost,
    StepFailed,
    Until,
    accept_hellos,
    recv_part,
    send_frame,
)


def nodes_of(worker_nodes: Sequence[str]) -> list[list[int]]:
    """The workers of each node (indices, ascending), nodes in the order of their first worker: the first of
    each list is the node's leader, and the server adds the nodes' parts in this order."""
    return list(by_node(worker_nodes).values())


class ChannelServer:
    """A server's end of the channel: listens on its node's address, then serves one step per exchange()."""

    def __init__(self, host: str):
        self.listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.links: list[socket.socket] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    def accept(self, nodes: list[list[int]], names: list[str], token: bytes, num_params: int, dtype,
               timeout: float) -> None:
        """Wait for every node's leader (which has its followers by then)."""
        try:
            self.links = accept_hellos(self.listener, len(nodes), token, Until.after(timeout))
        except ChannelLost:
            raise ChannelLost(f"the step channel was not built within {timeout:.0f} s: not every node's "
                              f"leader connected (nodes {', '.join(names)})") from None
        finally:
            self.listener.close()
        self.nodes, self.names = nodes, names
        self.parts = [np.empty(num_params, dtype=dtype) for _ in nodes]  # each node's part lands here
        self.step = 0

    def exchange(self, W: np.ndarray, rows: Sequence[np.ndarray], timeout: float) -> list[tuple]:
        """Send W and the step's rows (one array per worker) down, and return the nodes' parts, in node order
        (gradient sum, loss sum, count); the arrays are this channel's buffers, valid until the next step."""
        if not self.links:
            raise ChannelLost("the step channel is closed")
        until, node = Until.after(timeout), 0
        try:
            for node, link in enumerate(self.links):
                mine = [np.ascontiguousarray(rows[k], dtype=np.int64) for k in self.nodes[node]]
                counts = np.array([len(r) for r in mine], dtype=np.int64)
                send_frame(link, [DOWN.pack(self.step, len(mine)), counts, W, *mine], until)
            parts = []
            for node, link in enumerate(self.links):
                parts.append(recv_part(link, self.step, self.parts[node], until))
        except (ChannelLost, OSError) as e:
            self.close()
            raise ChannelLost(f"the step channel lost node {self.names[node]}: {e}") from None
        except StepFailed:
            self.close()
            raise
        self.step += 1
        return parts

    def close(self) -> None:
        """Closing the links ends every worker's end of the channel: its reads see the connection closed."""
        for link in self.links:
            link.close()
        self.links = []
        self.listener.close()
