"""Opening remote data (``gs://``, ``s3://``, any URI ``pyarrow.fs`` opens) within a bound, and cancellable.

A storage endpoint that accepts and never answers, or credentials that are looked for on a network that drops the
packets, block pyarrow's C++ call with no timeout of its own (over 250 s was seen, the service's queue held behind
it). The open runs in a thread of its own; the caller waits at most ``OPEN_SECONDS`` and, inside ``cancellable``
(as a job's data pass is), gives up as soon as the job is cancelled. A call given up on cannot be interrupted: its
daemon thread is left to finish or fail on its own, holding nothing the job needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from polyak.contract.errors import DataError

OPEN_SECONDS = 60.0
_POLL_SECONDS = 0.1
_scope = threading.local()
T = TypeVar("T")


class OpenCancelled(Exception):
    """The job was cancelled while its remote data was being opened."""


@contextmanager
def cancellable(should_cancel: Callable[[], bool]) -> Iterator[None]:
    """Remote opens in this thread, inside the block, give up when ``should_cancel()`` says so (OpenCancelled)."""
    previous = getattr(_scope, "should_cancel", None)
    _scope.should_cancel = should_cancel
    try:
        yield
    finally:
        _scope.should_cancel = previous


def within_bound(open_: Callable[[], T], uri: str) -> T:
    """``open_()``'s result, or DataError naming the URI when it has not answered in OPEN_SECONDS, or
    OpenCancelled when the job is cancelled meanwhile; its own errors are raised here."""
    should_cancel = getattr(_scope, "should_cancel", None) or (lambda: False)
    outcome: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = open_()
        except BaseException as e:  # handed to the waiting caller
            outcome["error"] = e
        done.set()

    threading.Thread(target=run, name=f"polyak-open {uri}", daemon=True).start()
    waited = 0.0
    while not done.wait(_POLL_SECONDS):
        waited += _POLL_SECONDS
        if should_cancel():
            raise OpenCancelled(uri)
        if waited >= OPEN_SECONDS:
            raise DataError(f"data.path: {uri} did not answer within {OPEN_SECONDS:g} s (the storage endpoint, or "
                            "its credentials' lookup, does not respond); check the URI and the network")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
