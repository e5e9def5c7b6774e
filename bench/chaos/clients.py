"""The client pool: N clients talking to the router without pause, every request's fate recorded.

Each client holds a conversation of a few turns with one model (so KV-cache
affinity has something to remember) and sends, by weight, a streamed chat turn,
a non-streamed one, or a /tokenize. A failed turn ends its conversation.
Each client draws from its own seeded random source.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

CHAT_PATH = "/olla/llamacpp/v1/chat/completions"
TOKENIZE_PATH = "/olla/llamacpp/tokenize"
MIX = {"stream": 0.7, "plain": 0.15, "tokenize": 0.15}
TURNS = (1, 4)
MAX_TOKENS = (8, 40)
USER_CHARS = (20, 160)
THINK = 0.05  # longest pause between two requests of one client, seconds
ALPHABET = string.ascii_lowercase + " " * 6


@dataclass(frozen=True)
class Result:
    kind: str  # stream, plain or tokenize
    model: str
    sent: float  # time.monotonic()
    ended: float
    status: int  # 0: no HTTP answer
    endpoint: str  # X-Olla-Endpoint, "" when the router sent none
    code: str  # an error body's or event's code, "truncated", or the exception's name
    message: str
    got_body: bool  # a byte of the response body arrived
    complete: bool  # the whole answer arrived, as its route defines it

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete


@dataclass
class _Answer:
    status: int = 0
    endpoint: str = ""
    code: str = ""
    message: str = ""
    got_body: bool = False
    complete: bool = False
    text: str = ""


class ClientPool:
    def __init__(self, base: str, models: list[str], clients: int, seed: int, timeout: float) -> None:
        self.base = base
        self.models = models
        self.clients = clients
        self.seed = seed
        self.timeout = timeout  # a client's own limit per request, beyond the router's
        self.results: list[Result] = []

    async def run(self, until: float) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(
                self._client(session, random.Random(f"{self.seed}:client:{i}"), until) for i in range(self.clients)
            ))  # fmt: skip

    async def _client(self, session: aiohttp.ClientSession, rng: random.Random, until: float) -> None:
        history: list[dict[str, str]] = []
        model, turns_left = "", 0
        while time.monotonic() < until:
            if turns_left == 0:
                model, history, turns_left = rng.choice(self.models), [], rng.randint(*TURNS)
            kind = rng.choices(list(MIX), list(MIX.values()))[0]
            if kind == "tokenize":
                body: dict[str, Any] = {"model": model, "content": _text(rng)}
                result, _ = await self._ask(session, TOKENIZE_PATH, body, kind, model)
            else:
                messages = [*history, {"role": "user", "content": _text(rng)}]
                body = {"model": model, "messages": messages, "max_tokens": rng.randint(*MAX_TOKENS),
                        "stream": kind == "stream"}  # fmt: skip
                result, reply = await self._ask(session, CHAT_PATH, body, kind, model)
                if result.ok:
                    history, turns_left = [*messages, {"role": "assistant", "content": reply}], turns_left - 1
                else:
                    turns_left = 0
            self.results.append(result)
            await asyncio.sleep(rng.uniform(0, THINK))

    async def _ask(
        self, session: aiohttp.ClientSession, path: str, body: dict[str, Any], kind: str, model: str
    ) -> tuple[Result, str]:
        sent = time.monotonic()
        answer = _Answer()
        try:
            async with asyncio.timeout(self.timeout):
                await _exchange(session, self.base + path, body, kind, answer)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            answer.code, answer.message = type(exc).__name__, str(exc)[:200]
        result = Result(kind, model, sent, time.monotonic(), answer.status, answer.endpoint, answer.code,
                        answer.message, answer.got_body, answer.complete)  # fmt: skip
        return result, answer.text


async def _exchange(session: aiohttp.ClientSession, url: str, body: dict[str, Any], kind: str, answer: _Answer) -> None:
    """Send one request and fill in `answer` as its response arrives (so a failure leaves what was seen)."""
    async with session.post(url, json=body) as response:
        answer.status, answer.endpoint = response.status, response.headers.get("X-Olla-Endpoint", "")
        if response.status != 200:
            answer.code, answer.message = _error(await response.read())
            return
        if kind == "stream":
            await _read_stream(response, answer)
            return
        document = orjson.loads(await response.read())
        answer.got_body = True
        if kind == "tokenize":
            answer.complete = isinstance(document.get("tokens"), list)
            return
        choice = (document.get("choices") or [{}])[0]
        answer.text = (choice.get("message") or {}).get("content") or ""
        answer.complete = bool(choice.get("finish_reason"))


async def _read_stream(response: aiohttp.ClientResponse, answer: _Answer) -> None:
    parts: list[str] = []
    done = finished = False
    async for line in response.content:
        answer.got_body = True
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        event = orjson.loads(payload)
        if "error" in event:
            answer.code, answer.message = _error(payload)
            return
        for choice in event.get("choices") or ():
            parts.append((choice.get("delta") or {}).get("content") or "")
            finished = finished or bool(choice.get("finish_reason"))
    answer.text = "".join(parts)
    answer.complete = done and finished
    if not answer.complete:
        answer.code = "truncated"


def _error(raw: bytes) -> tuple[str, str]:
    """The code and message of an OpenAI-shaped error body, or what there is of it."""
    try:
        error = orjson.loads(raw)["error"]
        return str(error.get("code", "")), str(error.get("message", ""))[:200]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "", raw[:200].decode("utf-8", "replace")


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(*USER_CHARS)))
