"""Refusals of the model lifecycle: each a FederationError (its gRPC status) and a builtin kind.

Python callers catch `LookupError` / `ValueError` / `RuntimeError` as usual; the
admin servicer maps `kind` to the gRPC status. A refused call changes nothing.
"""

from __future__ import annotations

from server.errors import ErrorKind, FederationError


class LifecycleError(FederationError):
    """A refused lifecycle request."""

    kind_of_error = ErrorKind.INVALID_ARGUMENT

    def __init__(self, message: str) -> None:
        super().__init__(self.kind_of_error, message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class UnknownNameError(LifecycleError, LookupError):
    """No such model, version, tag or test (NOT_FOUND)."""

    kind_of_error = ErrorKind.NOT_FOUND


class InvalidInputError(LifecycleError, ValueError):
    """A malformed argument: a split outside (0, 1), a metric not declared (INVALID_ARGUMENT)."""

    kind_of_error = ErrorKind.INVALID_ARGUMENT


class ConflictError(LifecycleError, RuntimeError):
    """The request does not fit the current state: an ended test, a test that exists."""

    kind_of_error = ErrorKind.FAILED_PRECONDITION


class AlreadyExistsError(LifecycleError, RuntimeError):
    kind_of_error = ErrorKind.ALREADY_EXISTS
