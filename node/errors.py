"""The one error type the agent raises for anything a caller did or asked wrong."""

from __future__ import annotations

import grpc


class AgentError(Exception):
    """A refused request: a gRPC status code and a one-line message for the user."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(name: str) -> AgentError:
    return AgentError(grpc.StatusCode.NOT_FOUND, f"no VM named {name!r} on this node")


def invalid(message: str) -> AgentError:
    return AgentError(grpc.StatusCode.INVALID_ARGUMENT, message)
