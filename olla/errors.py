"""Every error olla raises, and how each reaches a client.

    OllaError                      status  code                  type
    ├── ConfigError                  -     (exits 1; never a response)
    └── RequestFailed
        ├── InvalidRequest          400    invalid_request       invalid_request_error
        │   ├── InvalidJSON         400    invalid_json          invalid_request_error
        │   ├── ModelRequired       400    model_required        invalid_request_error
        │   ├── InvalidField        400    invalid_request (+ param)               (olla.requestcheck)
        │   ├── MalformedRequest    400    malformed_request                       (olla.server)
        │   ├── BodyTimeout         408    request_timeout                         (olla.server)
        │   ├── ExpectationFailed   417    expectation_failed                      (olla.server)
        │   └── HeadTooLarge        431    header_too_large                        (olla.server)
        ├── AuthenticationFailed    401    invalid_api_key       authentication_error  (WWW-Authenticate)
        ├── RouteNotFound           404    not_found             not_found_error
        ├── ModelNotFound           404    model_not_found       invalid_request_error
        ├── MethodNotAllowed        405    method_not_allowed    invalid_request_error  (Allow)
        ├── BodyTooLarge            413    request_too_large     invalid_request_error
        ├── RateLimited             429    rate_limit_exceeded   rate_limit_error  (Retry-After, X-RateLimit-*)
        ├── NoHealthyEndpoint       503    no_healthy_endpoint   server_error  (Retry-After)
        ├── SlotsExhausted          503    slots_exhausted       server_error  (Retry-After)
        ├── ShuttingDown            503    shutting_down         server_error  (Retry-After)
        └── UpstreamError           502    upstream_error        server_error
            ├── UpstreamUnreachable 502    backend_unreachable   server_error
            ├── UpstreamTimeout     504    backend_timeout       server_error
            ├── UpstreamRejected    (the endpoint answered 502/503/504 before any byte)
            └── UpstreamBroken      502    upstream_stream_broken server_error

Only `upstream.py` turns the client's exceptions into these; one place (`exchange.Front`) turns
a RequestFailed into OpenAI-shaped JSON `{"error": {"message", "type", "code"}}`,
with `Retry-After` when `retry_after` is set and any `headers()` the error adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


class OllaError(Exception):
    """Base of everything olla raises on purpose."""


class ConfigError(OllaError):
    """A configuration or profile file is invalid; `problems` names each bad key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RequestFailed(OllaError):
    status = 500
    code = "internal_error"
    type = "server_error"
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def headers(self) -> Mapping[str, str]:
        """Response headers this error adds to the JSON body."""
        return {}


class InvalidRequest(RequestFailed):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class ModelRequired(InvalidRequest):
    code = "model_required"


class MalformedRequest(InvalidRequest):
    """Not a valid HTTP/1.x request: the server's parser refused it."""

    code = "malformed_request"


class BodyTimeout(InvalidRequest):
    """The client stopped sending its body part way (a slow-loris body)."""

    status = 408
    code = "request_timeout"


class ExpectationFailed(InvalidRequest):
    status = 417
    code = "expectation_failed"


class HeadTooLarge(InvalidRequest):
    status = 431
    code = "header_too_large"


class AuthenticationFailed(RequestFailed):
    """No API key, or one no client has; the message never repeats the key."""

    status = 401
    code = "invalid_api_key"
    type = "authentication_error"

    def headers(self) -> Mapping[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="olla"'}


class RouteNotFound(RequestFailed):
    status = 404
    code = "not_found"
    type = "not_found_error"


class ModelNotFound(RequestFailed):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"


class MethodNotAllowed(RequestFailed):
    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"

    def __init__(self, method: str, path: str, allowed: str) -> None:
        super().__init__(f"{method} is not allowed on {path}; use {allowed}")
        self.allowed = allowed

    def headers(self) -> Mapping[str, str]:
        return {"Allow": self.allowed}


class BodyTooLarge(RequestFailed):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class RateLimited(RequestFailed):
    """A token bucket (global, the caller's, or the caller's status budget) was empty."""

    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int, headers: Mapping[str, str]) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self._headers = MappingProxyType(dict(headers))

    def headers(self) -> Mapping[str, str]:
        return self._headers


class NoHealthyEndpoint(RequestFailed):
    status = 503
    code = "no_healthy_endpoint"
    type = "server_error"
    retry_after = 5


class SlotsExhausted(RequestFailed):
    """The router's queue for a model was full, or a request waited in it too long."""

    status = 503
    code = "slots_exhausted"
    type = "server_error"
    retry_after = 2

    def __init__(self, message: str = "All slots are busy. Please try again later.") -> None:
        super().__init__(message)


class ShuttingDown(RequestFailed):
    """The router is draining after SIGTERM/SIGINT: requests in flight finish, new ones go elsewhere."""

    status = 503
    code = "shutting_down"
    type = "server_error"
    retry_after = 1


class UpstreamError(RequestFailed):
    """An attempt against one endpoint failed; `retryable` says whether another may be tried."""

    status = 502
    code = "upstream_error"
    retryable = True


class UpstreamUnreachable(UpstreamError):
    code = "backend_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "backend_timeout"


class UpstreamRejected(UpstreamError):
    """The endpoint answered 502, 503 or 504 before any byte reached the client."""

    def __init__(self, message: str, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status = status
        self.upstream_body = body
        self.upstream_headers = headers


class UpstreamBroken(UpstreamError):
    """The endpoint's stream broke after bytes went to the client; never retried."""

    code = "upstream_stream_broken"
    retryable = False
