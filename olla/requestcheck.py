"""What the router refuses in a request it forwards, before any endpoint sees it.

Pure: bytes and values in, a parsed document or an `InvalidRequest` out. Only the
fields the router itself reads are checked (`model`, `stream`, `messages`);
everything else is the endpoint's to judge, and the body is forwarded as it came.
A field set to null counts as absent, as llama-server reads it.

    InvalidRequest (olla.errors)    status  code
    └── InvalidField                 400    invalid_request   (with `param`, as OpenAI's errors)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from olla.errors import InvalidJSON, InvalidRequest
from olla.profiles import Route

MAX_DEPTH = 1024  # orjson's own nesting limit
# Routes whose body carries a conversation as a `messages` array (OpenAI chat, Anthropic messages).
MESSAGES_ROUTES = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"})


class InvalidField(InvalidRequest):
    """A field the router reads has the wrong type; `param` names it."""

    def __init__(self, param: str, expected: str, got: object) -> None:
        super().__init__(f"'{param}' must be {expected}, got {json_kind(got)}")
        self.param = param

    def body(self) -> dict[str, dict[str, str]]:
        body = super().body()
        body["error"]["param"] = self.param
        return body


def read(body: bytes, route: Route, model_field: str) -> object:
    """The body's JSON document, or None when empty; refused when the router cannot read it or its fields."""
    if not body:
        return None  # the model may come from the header; the endpoint judges the rest
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(_reason(body, exc)) from exc
    if not isinstance(document, dict):
        if route.model_from_body:
            raise InvalidRequest(f"request body must be a JSON object, got {json_kind(document)}")
        return document
    model = document.get(model_field)
    if route.model_from_body and model is not None and not (isinstance(model, str) and model):
        raise InvalidField(model_field, "a non-empty string naming the model", model)
    stream = document.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidField("stream", "a boolean", stream)
    messages = document.get("messages")
    if route.path in MESSAGES_ROUTES and messages is not None and not isinstance(messages, list):
        raise InvalidField("messages", "an array of messages", messages)
    return document


def _reason(body: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        body.decode()  # only on this failure path: orjson names no offset for bad UTF-8
    except UnicodeDecodeError as bad:
        return f"request body is not valid UTF-8: byte 0x{body[bad.start]:02x} at offset {bad.start}"
    if exc.msg.startswith("depth limit exceeded"):
        return f"request body is not valid JSON: arrays and objects nest deeper than {MAX_DEPTH} levels"
    return f"request body is not valid JSON: {exc}"


def header_text(headers: Mapping[str, str], name: str) -> str | None:
    """A header the router reads, or None when absent or empty; refused unless valid UTF-8."""
    value = headers.get(name)
    if not value:
        return None
    try:
        value.encode()
    except UnicodeEncodeError as exc:  # the server keeps undecodable bytes as surrogates
        raise InvalidRequest(f"the {name} header is not valid UTF-8") from exc
    return value


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
