"""Reading request bodies the way llama-server does, with its error messages.

Its JSON library's messages are imitated loosely: the status, the error type
and the leading `[json.exception...]` tag match, the rest of the text does not.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from olla.sim import errors, tokens


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # This llama-server build answers malformed JSON with a 500, not a 400.
        raise errors.server_error(f"[json.exception.parse_error.101] parse error: {exc}") from None
    if not isinstance(body, dict):
        raise errors.invalid(f"[json.exception.type_error.304] cannot use at() with {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def integer(body: dict[str, Any], *names: str, default: int) -> int:
    """The first of `names` present in the body, as an integer."""
    for name in names:
        if name in body and body[name] is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise errors.invalid(
                    f"Field '{name}': [json.exception.type_error.302] type must be number, but is {_json_type(value)}"
                )
            # llama-server reads these as 32-bit ints; a huge value must not break the reply's JSON.
            return max(INT32_MIN, min(INT32_MAX, int(value)))
    return default


def flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise errors.invalid(
            f"Field '{name}': [json.exception.type_error.302] type must be boolean, but is {_json_type(value)}"
        )
    return value


def seed(body: dict[str, Any]) -> int | None:
    value = integer(body, "seed", default=-1)
    return None if value < 0 or value == 0xFFFFFFFF else value


def prompt_tokens(body: dict[str, Any]) -> list[int]:
    """`prompt` as text, token ids, or a mix; BOS goes in front of text like add_special does."""
    if "prompt" not in body:
        raise errors.invalid("[json.exception.out_of_range.403] key 'prompt' not found")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokens.tokenize(prompt, add_bos=True)
    if isinstance(prompt, list) and all(isinstance(p, (int, str)) and not isinstance(p, bool) for p in prompt):
        out: list[int] = []
        for part in prompt:
            out += tokens.tokenize(part, add_bos=not out) if isinstance(part, str) else [part]
        if not out:
            raise errors.invalid('"prompt" must not be empty')
        if not all(tokens.is_valid(t) for t in out):
            raise errors.invalid("Prompt contains invalid tokens")
        return out
    if isinstance(prompt, list):
        raise errors.invalid("olla sim answers one prompt per request; send several requests instead")
    raise errors.invalid('"prompt" must be a string, a list of tokens, or a list of prompts')


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" not in body:
        raise errors.invalid("'messages' is required")
    value = body["messages"]
    if not isinstance(value, list):
        raise errors.invalid("Expected 'messages' to be an array")
    for message in value:
        if not isinstance(message, dict):
            raise errors.invalid("Expected 'messages' items to be objects")
        try:
            tokens.message_text(message.get("content"))
        except ValueError as exc:
            raise errors.invalid(str(exc)) from None
    return value


def chat_tokens(body: dict[str, Any]) -> list[int]:
    return tokens.tokenize(tokens.chat_prompt(messages(body)), add_bos=True)


def embedding_inputs(body: dict[str, Any]) -> list[list[int]]:
    """`input` (or native `content`): a string, a token list, or a list of those."""
    value = body.get("input", body.get("content"))
    if value is None:
        raise errors.invalid('"input" or "content" must be provided')
    if value == []:
        raise errors.invalid("Input content cannot be empty")
    items = value if isinstance(value, list) and not _is_token_list(value) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(tokens.tokenize(item, add_bos=True))
        elif isinstance(item, list) and item and _is_token_list(item) and all(tokens.is_valid(t) for t in item):
            out.append(list(item))
        else:
            raise errors.invalid('"input" must be a string, a list of tokens, or a list of those')
    return out


def _is_token_list(value: list[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)
