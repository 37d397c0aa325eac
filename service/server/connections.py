"""Connections that cannot be held open for nothing: uvicorn's h11 protocol with read deadlines.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but sets no deadline on a request that is
still arriving: a socket that connects and sends nothing, or half a header, or part of a body, is held forever,
and a few hundred of them hold the server's file descriptors and memory. Here a connection gets ``seconds`` for a
request's headers (from the connection, or the end of the previous response) and ``seconds`` between two reads of
its body; then it is closed. Nothing is timed while the app answers: an event stream stays open as long as its
client reads it.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_REQUEST_TIMEOUT = 20.0


class DeadlineH11Protocol(H11Protocol):
    seconds = DEFAULT_REQUEST_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Headers: the deadline set when the request began stands. Body: each read gives the next one its time.
        # Whole: the app has it, and nothing is timed.
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm()
        elif state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def with_deadline(seconds: float) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)``, with this many seconds per deadline."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"seconds": seconds})
