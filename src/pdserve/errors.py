"""Errors that cross the project's seams; each maps to one HTTP status at the frontend."""
from __future__ import annotations


class PdserveError(Exception):
    """Base class of pdserve's own errors."""

    http_status = 500
    error_type = "internal_error"


class InvalidRequestError(PdserveError, ValueError):
    """The request itself is wrong (user input): HTTP 400 with OpenAI's error body."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve: HTTP 404, as OpenAI answers."""

    http_status = 404
    code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, "model")


class ModelLoadError(PdserveError, ValueError):
    """A checkpoint cannot be found, parsed or matched to the architecture."""

    error_type = "model_load_error"


class DeviceError(PdserveError, ValueError):
    """``--device`` names no backend, or one that cannot run here (see ``pdserve.devices``)."""

    error_type = "device_error"


class OverloadedError(PdserveError):
    """The cluster cannot take the request now: HTTP 429 (or 503) with Retry-After."""

    http_status = 429
    error_type = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkerDeadError(PdserveError):
    """A worker died or stopped answering while it held the request: HTTP 503."""

    http_status = 503
    error_type = "worker_unavailable"


class DeadlineExceededError(PdserveError):
    """The request's deadline passed before it finished: it was aborted everywhere (HTTP 504)."""

    http_status = 504
    error_type = "timeout"
