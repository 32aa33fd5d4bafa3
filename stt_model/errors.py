"""The one base class of the errors a user can fix.

A bad argument, config, checkpoint, file or volume raises a :class:`UserInputError` (a
``ValueError``, so the Python API keeps its usual exception types); ``stt`` reports it in one
line and exits 2. Any other exception is a bug of ours and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Something the user gave (argument, config, checkpoint, file, volume) cannot be used; the
    message says what and what was expected."""


class UserTypeError(UserInputError, TypeError):
    """A :class:`UserInputError` about a dtype or type (also a ``TypeError``)."""
