"""The JSON of a generation, in llama-server's three dialects.

Each format gives the events of a stream (opening, one per token, closing) and
the body of a non-streamed reply. Keys are in the real server's order, which
only matters to people diffing the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from olla.sim import tokens
from olla.sim.engine import Generation


@dataclass(frozen=True)
class Reply:
    model: str
    id: str
    created: int
    fingerprint: str
    settings: dict[str, Any]
    include_usage: bool = False
    return_tokens: bool = False


class Format(Protocol):
    done_marker: bool

    def opening(self, reply: Reply, gen: Generation) -> list[dict[str, Any]]: ...
    def partial(self, reply: Reply, gen: Generation, token: int) -> list[dict[str, Any]]: ...
    def closing(self, reply: Reply, gen: Generation) -> list[dict[str, Any]]: ...
    def whole(self, reply: Reply, gen: Generation) -> dict[str, Any]: ...


def finish_reason(gen: Generation) -> str:
    return "length" if gen.stop_type == "limit" else "stop"


def usage(gen: Generation) -> dict[str, Any]:
    n = len(gen.tokens)
    return {
        "completion_tokens": n,
        "prompt_tokens": len(gen.prompt),
        "total_tokens": len(gen.prompt) + n,
        "prompt_tokens_details": {"cached_tokens": gen.cache_n},
    }


def _text(token: int) -> str:
    return tokens.detokenize([token])


class Native:
    """`/completion` and `/infill`: no `[DONE]`, the last event has `stop: true`."""

    done_marker = False

    def opening(self, reply: Reply, gen: Generation) -> list[dict[str, Any]]:
        return []

    def partial(self, reply: Reply, gen: Generation, token: int) -> list[dict[str, Any]]:
        return [
            {
                "index": 0,
                "content": _text(token),
                "tokens": [token],
                "stop": False,
                "id_slot": -1,
                "tokens_predicted": len(gen.tokens),
                "tokens_evaluated": len(gen.prompt),
            }
        ]

    def closing(self, reply: Reply, gen: Generation) -> list[dict[str, Any]]:
        return [self._final(reply, gen, streamed=True)]

    def whole(self, reply: Reply, gen: Generation) -> dict[str, Any]:
        return self._final(reply, gen, streamed=False)

    def _final(self, reply: Reply, gen: Generation, streamed: bool) -> dict[str, Any]:
        return {
            "index": 0,
            "content": "" if streamed else gen.text,
            "tokens": list(gen.tokens) if reply.return_tokens and not streamed else [],
            "id_slot": gen.slot.id,
            "stop": True,
            "model": reply.model,
            "tokens_predicted": len(gen.tokens),
            "tokens_evaluated": len(gen.prompt),
            "generation_settings": reply.settings,
            "prompt": tokens.detokenize(gen.prompt),
            "has_new_line": "\n" in gen.text,
            "truncated": gen.truncated,
            "stop_type": gen.stop_type,
            "stopping_word": "",
            "tokens_cached": gen.tokens_cached,
            "timings": gen.timings(),
        }


class Completion:
    """OpenAI `/v1/completions`: the last chunk carries usage and timings, then `[DONE]`."""

    done_marker = True

    def opening(self, reply: Reply, gen: Generation) -> list[dict[str, Any]]:
        return []

    def partial(self, reply: Reply, gen: Generation, token: int) -> list[dict[str, Any]]:
        return [self._chunk(reply, _text(token), None)]

    def closing(self, reply: Reply, gen: Generation) -> list[dict[str, Any]]:
        chunk = self._chunk(reply, "", finish_reason(gen))
        del chunk["id"]
        chunk |= {"usage": usage(gen), "id": reply.id, "timings": gen.timings()}
        return [chunk]

    def whole(self, reply: Reply, gen: Generation) -> dict[str, Any]:
        return {
            "choices": [{"text": gen.text, "index": 0, "logprobs": None, "finish_reason": finish_reason(gen)}],
            "created": reply.created,
            "model": reply.model,
            "system_fingerprint": reply.fingerprint,
            "object": "text_completion",
            "usage": usage(gen),
            "id": reply.id,
            "timings": gen.timings(),
        }

    def _chunk(self, reply: Reply, text: str, reason: str | None) -> dict[str, Any]:
        return {
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
            "created": reply.created,
            "model": reply.model,
            "system_fingerprint": reply.fingerprint,
            "object": "text_completion",
            "id": reply.id,
        }


class Chat:
    """OpenAI chat: a role delta, content deltas, a finish chunk, maybe usage, `[DONE]`."""

    done_marker = True

    def opening(self, reply: Reply, gen: Generation) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": None}
        return [self._chunk(reply, [{"finish_reason": None, "index": 0, "delta": role}])]

    def partial(self, reply: Reply, gen: Generation, token: int) -> list[dict[str, Any]]:
        return [self._chunk(reply, [{"finish_reason": None, "index": 0, "delta": {"content": _text(token)}}])]

    def closing(self, reply: Reply, gen: Generation) -> list[dict[str, Any]]:
        finish = self._chunk(reply, [{"finish_reason": finish_reason(gen), "index": 0, "delta": {}}])
        if not reply.include_usage:
            return [finish | {"timings": gen.timings()}]
        return [finish, self._chunk(reply, []) | {"usage": usage(gen), "timings": gen.timings()}]

    def whole(self, reply: Reply, gen: Generation) -> dict[str, Any]:
        return {
            "choices": [
                {
                    "finish_reason": finish_reason(gen),
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                }
            ],
            "created": reply.created,
            "model": reply.model,
            "system_fingerprint": reply.fingerprint,
            "object": "chat.completion",
            "usage": usage(gen),
            "id": reply.id,
            "timings": gen.timings(),
        }

    def _chunk(self, reply: Reply, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "choices": choices,
            "created": reply.created,
            "id": reply.id,
            "model": reply.model,
            "system_fingerprint": reply.fingerprint,
            "object": "chat.completion.chunk",
        }
