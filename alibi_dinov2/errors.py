"""The project's user errors: a problem with what the user gave, reported as one line that names it (see
:func:`alibi_dinov2.cli.run_command`)."""

from __future__ import annotations


class InputError(ValueError):
    """A problem with what the user gave (a path, a file, a value); its message is one line that names it."""


class SourceNotFoundError(InputError, FileNotFoundError):
    """A model, image or folder that does not exist."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message ('' when it has none): what a one-line report quotes of it."""
    message = str(error)
    return message.splitlines()[0] if message else ""
