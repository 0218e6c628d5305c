"""The errors a lake reader raises, each with a message a user can act on."""

from __future__ import annotations


class LakeError(Exception):
    """The root is not a lake (missing, or no ``runs/`` folder); the message says what to do."""


class SandboxError(Exception):
    """A user query was refused; the message names what was refused and why."""


class QueryError(Exception):
    """A query failed (syntax, binder, time or memory limit); the message says why."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
