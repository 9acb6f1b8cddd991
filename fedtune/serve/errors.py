"""Errors of the serving layer, each carrying its OpenAI error shape and HTTP status.

OpenAI's clients read ``{"error": {"message", "type", "param", "code"}}`` and map the status to an
exception class (400 BadRequestError, 404 NotFoundError, 503 InternalServerError ...), so every failure
a request can meet is one of these, raised by library code and rendered by the app.
"""

from __future__ import annotations


class ServeError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServeError):
    status, type = 400, "invalid_request_error"


class ModelNotFound(ServeError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class Unavailable(ServeError):
    """The server cannot take the request now (shutting down, adapter files gone); retrying may work."""

    status, type = 503, "server_error"


class AdapterRefused(ServeError):
    """An adapter failed verification or cannot be served over this base; the previous one stays."""

    status, type, code = 503, "server_error", "adapter_refused"
