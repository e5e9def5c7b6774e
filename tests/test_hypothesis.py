"""Thousands of generated requests (methods, paths, headers, bodies) thrown at one router in front of one emulator.

Whatever arrives, the router answers (never a crash or a silent close), makes no
5xx of its own except the upstream-availability answers below, logs no error,
and still serves a normal request afterwards.

The requests are raw bytes, so the generated paths and headers reach aiohttp's
parser unnormalised. Hypothesis runs in a worker thread with a blocking socket
while the test's event loop serves the router and the emulator.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rawhttp import Answer, request, send, send_blocking, serving
from tests.routerkit import CHAT, chat, ep, fast, wait_until

T = TypeVar("T")
EXAMPLES = 2000
BODY_LIMIT = 16 * 1024
# A 5xx the router makes itself is legitimate only when it reports the endpoint unavailable: it failed or
# refused before answering (502 backend_unreachable; 502/503/504 upstream_error carrying its own status),
# sent no headers in time (504), or nothing routable or no free slot was left (503). Anything else, a 500
# above all, is the router failing on its input.
AVAILABILITY = {
    502: {"backend_unreachable", "upstream_error"},
    503: {"upstream_error", "no_healthy_endpoint", "slots_exhausted"},
    504: {"upstream_error", "backend_timeout"},
}

ROUTES = ["/v1/chat/completions", "/v1/completions", "/completion", "/v1/embeddings", "/embedding", "/tokenize",
          "/detokenize", "/infill", "/rerank", "/v1/rerank", "/v1/messages", "/v1/messages/count_tokens",
          "/apply-template", "/v1/models", "/slots", "/props", "/metrics", "/health"]  # fmt: skip
OWN = ["/internal/health", "/internal/status", "/internal/status/endpoints", "/internal/status/models",
       "/olla/models", "/metrics", "/"]  # fmt: skip
SEGMENTS = ["..", ".", "", "%2e%2e", "%2E", "%2f", "%2F", "%00", "%ff", "%zz", "%", "v1", "chat", "completions",
            "models", "slots", "internal", "status", "olla", "llamacpp", "~", ";x=1", "%c3%a9"]  # fmt: skip
HEADER_NAMES = ["X-Olla-Model", "X-Olla-Session-ID"] * 3 + ["Content-Type", "X-Request-Id", "Authorization", "Accept",
                "Content-Encoding", "Expect", "X-Forwarded-For", "Cookie", "Accept-Encoding", "X-Api-Key",
                "X-Conversation-Id", "Upgrade", "Transfer-Encoding", "Host", "Range", "Origin"]  # fmt: skip
HEADER_VALUES = [CHAT, "ghost", "", "application/json", "gzip", "deflate", "br", "identity", "100-continue",
                 "websocket", "chunked", "Bearer x", "bytes=0-1"]  # fmt: skip

# Raw bytes may carry anything but CR and LF, which would end the request line or header early.
line_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
# What a header value may carry after parsing: visible ASCII, space, and bytes beyond ASCII, UTF-8 or not.
field_bytes = st.lists(st.integers(0x20, 0x7E) | st.integers(0x80, 0xFF), max_size=20).map(bytes)
ascii_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


def mostly(usual: st.SearchStrategy[T], rare: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """`usual` four times in five (`one_of` would favour `rare`, whose values are more varied): input that never
    parses would never reach the router's own code."""

    @st.composite
    def pick(draw: st.DrawFn) -> T:
        return draw(rare if draw(st.integers(0, 4)) == 4 else usual)  # 0, the simplest, is drawn often

    return pick()


methods = mostly(
    st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    st.from_regex(r"[A-Z]{1,10}", fullmatch=True),
)
paths = mostly(
    st.sampled_from(ROUTES).map(lambda p: "/olla/llamacpp" + p),
    st.one_of(
        st.sampled_from(OWN),
        st.lists(
            st.sampled_from(SEGMENTS) | ascii_text.filter(lambda s: "?" not in s and "#" not in s), max_size=6
        ).map(lambda parts: "/olla/llamacpp/" + "/".join(parts)),
        st.lists(st.sampled_from(SEGMENTS), max_size=6).map(lambda parts: "/" + "/".join(parts)),
    ),
).map(str.encode)
targets = mostly(
    paths | st.tuples(paths, ascii_text).map(lambda t: t[0] + b"?" + t[1].encode()),
    st.tuples(paths, line_bytes).map(lambda t: t[0] + t[1].replace(b" ", b"")),
)
headers = st.lists(
    st.tuples(
        st.sampled_from(HEADER_NAMES) | st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True),
        mostly(
            (st.sampled_from(HEADER_VALUES) | ascii_text | st.text(max_size=20)).map(str.encode) | field_bytes,
            line_bytes,
        ),
    ).filter(lambda h: h[0].lower() not in ("content-length", "connection")),  # the framing is ours
    max_size=4,
).map(lambda pairs: [name.encode() + b": " + value for name, value in pairs])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]) | json_values,
            "content": st.text(max_size=30) | json_values,
        }
    ),
    max_size=3,
)
requests_shaped = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([CHAT, "ghost", ""]) | json_values,
        "messages": messages | json_values,
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(-1, 8) | json_values,
        "n_predict": st.integers(-1, 8),
        "prompt": st.text(max_size=40) | json_values,
        "content": st.text(max_size=40) | json_values,
        "tokens": st.lists(st.integers(0, 50), max_size=5) | json_values,
        "input": st.text(max_size=40) | json_values,
    },
).map(orjson.dumps)


def nested(depth: int, in_message: bool) -> bytes:
    deep = b"[" * depth + b"]" * depth
    if in_message:  # the router hashes messages for KV-cache affinity
        return b'{"model": "chat-model", "messages": [{"role": "user", "content": "hi", "x": ' + deep + b"}]}"
    return b'{"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "x": ' + deep + b"}"


bodies = st.one_of(
    requests_shaped,
    requests_shaped,
    json_values.map(orjson.dumps),
    st.binary(max_size=200),
    st.tuples(requests_shaped, st.integers(0, 60), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    ),
    st.tuples(requests_shaped, st.integers(0, 60)).map(lambda t: t[0][: t[1]]),
    st.builds(nested, st.integers(1, 1100), st.booleans()),
    st.from_regex(r"-?[0-9]{1,400}(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?", fullmatch=True).map(
        lambda n: b'{"model": "chat-model", "max_tokens": ' + n.encode() + b', "prompt": "x"}'
    ),
    st.integers(BODY_LIMIT - 8, BODY_LIMIT + 8).map(lambda n: b"x" * n),
)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    body: bytes = draw(bodies)
    head = [draw(methods).encode() + b" " + draw(targets) + b" HTTP/1.1", b"Host: olla.test", b"Connection: close"]
    head += draw(headers)
    if draw(st.booleans()):
        head.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(head) + b"\r\n\r\n" + body
    head.append(b"Transfer-Encoding: chunked")
    cut = draw(st.integers(0, len(body)))
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:cut], body[cut:]) if c)
    return b"\r\n".join(head) + b"\r\n\r\n" + chunks + b"0\r\n\r\n"


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every ERROR record: the router's (olla.server) and the emulator's (aiohttp.server) alike."""
    return [f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else f"{r.name}: {r.getMessage()}"
            for r in caplog.records if r.levelno >= logging.ERROR]  # fmt: skip


async def test_generated_requests_never_make_the_router_fail(start_sims, caplog) -> None:
    (sim,) = await start_sims(fast(decode_ms=0.0, slots=4, n_ctx=256))
    seen: Counter[tuple[int, str]] = Counter()
    async with serving(
        [ep("a", sim)], server={"request_limits": {"max_body_size": BODY_LIMIT}}, proxy={"response_timeout": "10s"}
    ) as served:
        port = served.port

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
        @given(raw_requests())
        def the_router_answers(data: bytes) -> None:
            answer = send_blocking(port, data)
            assert answer.status, f"no answer to {data[:300]!r}"
            origin = "endpoint" if answer.from_endpoint else "router"
            seen[(answer.status, origin)] += 1
            if origin == "router" and answer.status >= 500:
                assert answer.error["code"] in AVAILABILITY.get(answer.status, ()), (answer.body[:300], data[:300])
            assert not errors_logged(caplog), errors_logged(caplog)

        await asyncio.to_thread(the_router_answers)

        # The run reached every layer: the parser, the router's own refusals, and the endpoint.
        statuses = {status for status, _ in seen}
        assert {(200, "endpoint"), (404, "router"), (400, "router")} <= set(seen), seen
        assert {405, 413} <= statuses, seen
        assert not errors_logged(caplog)

        registry = served.app.registry
        await wait_until(registry, lambda: all(e.routable for e in registry))
        answer: Answer = await send(port, request("POST", "/olla/llamacpp/v1/chat/completions", orjson.dumps(chat())))
        assert answer.status == 200 and answer.json()["choices"][0]["message"]["role"] == "assistant"
