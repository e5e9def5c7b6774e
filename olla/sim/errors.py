"""llama-server's error replies: `{"error": {"code", "message", "type"}}`, status == code."""

from __future__ import annotations

from typing import Any

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


class SimError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or TYPES.get(status, "server_error")
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "type": self.type, **self.extra}}


def invalid(message: str) -> SimError:
    return SimError(400, message)


def server_error(message: str) -> SimError:
    return SimError(500, message)


def not_supported(message: str) -> SimError:
    return SimError(501, message)


def unavailable(message: str) -> SimError:
    return SimError(503, message)


def context_exceeded(n_prompt: int, n_ctx: int) -> SimError:
    return SimError(
        400,
        f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), try increasing it",
        "exceed_context_size_error",
        n_prompt_tokens=n_prompt,
        n_ctx=n_ctx,
    )


# These two keep the key order of the HTTP layer that writes them.
NOT_FOUND = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
BAD_API_KEY = {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
