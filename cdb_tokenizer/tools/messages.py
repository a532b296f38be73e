"""One-line error messages: what the CLI, the training scripts and the loaders print instead of a traceback."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["first_line"]
