"""The trained model's own error, apart from the model so that its exporters (client/export.py) raise it too
without importing the model they export."""

from __future__ import annotations

from polyak.contract.errors import PolyakError


class ModelError(PolyakError):
    """A weights file that is not a usable model, or inputs the model cannot take; the message is one line."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a library's multi-line message would break the one error line)."""
    return " ".join(str(e).split()) or type(e).__name__
