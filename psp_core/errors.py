"""The one error type for input a user gave that cannot be used (a file, a setting, a reference).

Front ends report it in one line; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used; the message is one line naming the file, key or value at fault."""


class CheckpointError(InputError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or of the wrong architecture."""
