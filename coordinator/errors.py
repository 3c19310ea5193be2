"""Refusals a user can cause, as a gRPC status code and one line of text."""

from __future__ import annotations

import grpc


class CoordinatorError(Exception):
    """A refused or failed request: the status code and message the caller sees."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(message: str) -> CoordinatorError:
    return CoordinatorError(grpc.StatusCode.NOT_FOUND, message)


def invalid(message: str) -> CoordinatorError:
    return CoordinatorError(grpc.StatusCode.INVALID_ARGUMENT, message)


def precondition(message: str) -> CoordinatorError:
    return CoordinatorError(grpc.StatusCode.FAILED_PRECONDITION, message)


def exists(message: str) -> CoordinatorError:
    return CoordinatorError(grpc.StatusCode.ALREADY_EXISTS, message)


def exhausted(message: str) -> CoordinatorError:
    return CoordinatorError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
