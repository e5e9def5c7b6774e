"""Hostile and broken input, sent as raw bytes to the router as `olla serve` runs it.

Each gets a 4xx in OpenAI's shape from the router itself (no `X-Olla-Endpoint`),
nothing reaches an endpoint that should not, nothing is logged at ERROR, and
endpoint secrets never show.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from olla import proxy
from olla.logs import AccessLog, JsonFormatter, TextFormatter
from olla.messages import Request, Response
from olla.server import Server
from olla.wire import MAX_FIELD_SIZE, MAX_HEADERS, MAX_LINE_SIZE
from tests.rawhttp import Answer, Served, read_answer, request, send, serving
from tests.routerkit import CHAT, chat, ep, fast
from tests.simkit import until

CHAT_PATH = "/olla/llamacpp/v1/chat/completions"
BODY_LIMIT = 64 * 1024


@pytest.fixture
async def router(start_sims) -> AsyncIterator[Served]:  # type: ignore[no-untyped-def]
    (sim,) = await start_sims(fast())
    async with serving([ep("a", sim)], server={"request_limits": {"max_body_size": BODY_LIMIT}}) as served:
        yield served


def forwarded(served: Served) -> int:
    """Attempts the router has made against its endpoints."""
    return sum(e.requests for e in served.app.registry)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


async def refused(served: Served, data: bytes, status: int, code: str) -> dict[str, str]:
    """Send `data`; the router itself answers `status` `code` without forwarding anything."""
    before = forwarded(served)
    answer = await send(served.port, data)
    assert (answer.status, answer.error["code"]) == (status, code), answer.body
    assert not answer.from_endpoint and forwarded(served) == before
    return answer.error


# --- bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model": "chat-model", "messages": [', "unexpected end of data"),
        (b'{"model": "chat-model"} trailing', "unexpected content after document"),
        (b"\xef\xbb\xbf{}", "byte order mark"),
        (b'{"model": NaN}', "unexpected character"),
        (b'{"model": "\\ud800"}', "surrogate"),
        (b"[" * 10_000 + b"]" * 10_000, "nest deeper than 1024 levels"),
        (b'{"a":' * 1025 + b"1" + b"}" * 1025, "nest deeper than 1024 levels"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8: byte 0xe9 at offset 46"),
        (b'{"model": "\xed\xa0\x80"}', "not valid UTF-8: byte 0xed at offset 11"),  # an encoded surrogate
    ],
)
async def test_a_body_that_is_not_json_is_refused_precisely(router, caplog, body, says) -> None:
    error = await refused(router, request("POST", CHAT_PATH, body), 400, "invalid_json")
    assert says in error["message"]
    assert not errors_logged(caplog)


@pytest.mark.parametrize(
    ("path", "document", "param", "got"),
    [
        (CHAT_PATH, {"model": 7, "messages": []}, "model", "a number"),
        (CHAT_PATH, {"model": ["chat-model"], "messages": []}, "model", "an array"),
        (CHAT_PATH, {"model": {"id": "chat-model"}}, "model", "an object"),
        (CHAT_PATH, {"model": True}, "model", "a boolean (true)"),
        (CHAT_PATH, {"model": ""}, "model", "an empty string"),
        (CHAT_PATH, {"model": CHAT, "stream": "yes"}, "stream", "a string"),
        (CHAT_PATH, {"model": CHAT, "stream": 1}, "stream", "a number"),
        (CHAT_PATH, {"model": CHAT, "messages": "hi"}, "messages", "a string"),
        ("/olla/llamacpp/v1/messages", {"model": CHAT, "messages": {"role": "user"}}, "messages", "an object"),
        ("/olla/llamacpp/completion", {"prompt": "x", "model": 1.5}, "model", "a number"),
    ],
)
async def test_a_field_the_router_reads_must_have_its_type(router, path, document, param, got) -> None:
    error = await refused(router, request("POST", path, orjson.dumps(document)), 400, "invalid_request")
    assert error["param"] == param
    assert error["message"].startswith(f"'{param}' must be ") and error["message"].endswith(f", got {got}")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"chat-model"', b"42", b"true", b"null"])
async def test_the_body_must_be_a_json_object(router, body) -> None:
    error = await refused(router, request("POST", CHAT_PATH, body), 400, "invalid_request")
    assert error["message"].startswith("request body must be a JSON object, got ")


async def test_null_fields_count_as_absent_and_other_fields_are_the_endpoints(router) -> None:
    document = {"model": None, "stream": None, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answer = await send(router.port, request("POST", CHAT_PATH, orjson.dumps(document)))
    assert answer.status == 200 and answer.from_endpoint  # the fleet's only model
    # A field the router does not read is the endpoint's to judge, and its answer passes through.
    wrong = {**chat(), "max_tokens": "many"}
    answer = await send(router.port, request("POST", CHAT_PATH, orjson.dumps(wrong)))
    assert answer.from_endpoint


async def test_the_forwarded_body_is_the_bytes_sent(start_sims) -> None:
    (sim,) = await start_sims(fast())
    async with serving([ep("a", sim)]) as served:
        body = b'{ "model" : "chat-model",\n  "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2 }'
        answer = await send(served.port, request("POST", CHAT_PATH, body))
        assert answer.status == 200 and answer.from_endpoint


async def test_json_nested_up_to_the_limit_is_forwarded(router, caplog) -> None:
    # orjson reads 1024 levels but writes only 255: the conversation key is skipped, the request still goes.
    deep = b"[" * 1000 + b"]" * 1000
    body = (
        b'{"model": "chat-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "x": ' + deep + b"}"
    )
    answer = await send(router.port, request("POST", CHAT_PATH, body))
    assert answer.status == 200 and answer.from_endpoint
    nested = b'{"role": "user", "content": "hi", "extra": ' + b"[" * 300 + b"]" * 300 + b"}"
    body = (
        b'{"model": "chat-model", "max_tokens": 2, "messages": [' + nested + b', {"role": "user", "content": "again"}]}'
    )
    answer = await send(router.port, request("POST", CHAT_PATH, body))
    assert answer.from_endpoint and answer.status < 500
    assert not errors_logged(caplog)


@pytest.mark.parametrize("header", ["X-Olla-Model", "X-Olla-Session-ID"])
async def test_a_header_the_router_reads_must_be_utf8(router, caplog, header) -> None:
    raw = header.encode() + b": \xff\xfe"
    data = request("POST", "/olla/llamacpp/completion", b'{"prompt": "x", "n_predict": 1}', [raw])
    error = await refused(router, data, 400, "invalid_request")
    assert header in error["message"] and "UTF-8" in error["message"]
    assert not errors_logged(caplog)


async def test_a_utf8_model_header_names_a_model(router) -> None:
    data = request("POST", "/olla/llamacpp/tokenize", b'{"content": "x"}', ["X-Olla-Model: mod\u00e8le".encode()])
    error = await refused(router, data, 404, "model_not_found")
    assert "mod\u00e8le" in error["message"]


async def test_a_compressed_body_is_read_and_forwarded_plain(router, caplog) -> None:
    document = gzip.compress(orjson.dumps(chat()))
    answer = await send(router.port, request("POST", CHAT_PATH, document, ["Content-Encoding: gzip"]))
    assert answer.status == 200 and answer.from_endpoint
    error = await refused(router, request("POST", CHAT_PATH, b"not gzip", ["Content-Encoding: gzip"]), 400,
                          "invalid_request")  # fmt: skip
    assert "could not be read" in error["message"] and "gzip" in error["message"]
    # Brotli decodes only with its package installed; without it the parser refuses the request at once.
    answer = await send(router.port, request("POST", CHAT_PATH, b"not brotli", ["Content-Encoding: br"]))
    assert answer.status == 400 and answer.error["code"] in ("invalid_request", "malformed_request")
    assert not answer.from_endpoint
    assert not errors_logged(caplog)


async def test_a_body_over_the_limit_is_refused_before_it_is_read(router) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    head = request("POST", CHAT_PATH, headers=[f"Content-Length: {BODY_LIMIT * 100}"], content_length=False)
    writer.write(head + b"{" * 1000)  # the rest never comes: the answer must not wait for it
    async with asyncio.timeout(2):
        answer = await read_answer(reader)
    writer.close()
    assert answer.status == 413 and answer.error["code"] == "request_too_large"


async def test_a_body_that_stops_arriving_gets_408(router, monkeypatch) -> None:
    monkeypatch.setattr(proxy, "BODY_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    started = time.monotonic()
    writer.write(request("POST", CHAT_PATH, headers=["Content-Length: 100"], content_length=False) + b'{"mo')
    async with asyncio.timeout(2):
        answer = await read_answer(reader)
    writer.close()
    assert answer.status == 408 and answer.error["code"] == "request_timeout"
    assert 0.3 <= time.monotonic() - started < 1.5


# --- paths and methods ------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/olla/llamacpp/../internal/status",
        "/olla/llamacpp/v1/../../../internal/status",
        "/olla/llamacpp/%2e%2e/internal/status",
        "/olla/llamacpp/%2E%2E/%2E%2E/metrics",
        "/olla/llamacpp/..%2fslots",
        "/olla/llamacpp/%252e%252e/slots",
        "/olla/llamacpp/slots",
        "/olla/llamacpp/props",
        "/olla/llamacpp/v1/models/../../slots",
        "/olla/llamacpp/./v1/chat/completions",
        "/olla/llamacpp//v1/chat/completions",
        "//olla/llamacpp/v1/chat/completions",
        "/olla/llamacpp/v1%2fchat%2fcompletions",
        "/olla/llamacpp/v1/chat%2Fcompletions",
        "/olla/llamacpp/v1%2Fmodels",  # would reach the endpoint's own /v1/models
        "/olla%2fllamacpp/v1/chat/completions",
        "/internal%2fstatus",
        "/olla/llamacpp/v1/chat/completions/",
        "http://olla.test/olla/llamacpp/../internal/status",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_path_tricks_never_leave_the_allowlist(router, target, method) -> None:
    body = orjson.dumps(chat()) if method == "POST" else b""
    await refused(router, request(method, target, body), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", CHAT_PATH),
        ("PUT", CHAT_PATH),
        ("DELETE", CHAT_PATH),
        ("PATCH", "/olla/llamacpp/tokenize"),
        ("OPTIONS", CHAT_PATH),
        ("DELETE", "/internal/status"),
        ("POST", "/metrics"),
        ("POST", "/olla/llamacpp/v1/models"),
    ],
)
async def test_a_wrong_method_is_405(router, method, target) -> None:
    await refused(router, request(method, target, b"{}"), 405, "method_not_allowed")


# --- what the server refuses before the app --------------------------------


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (request("GET", "/olla/llamacpp/" + "a" * MAX_LINE_SIZE), 431, "header_too_large"),
        (request("GET", "/internal/health", headers=["X-Big: " + "a" * (MAX_FIELD_SIZE + 1)]), 431,
         "header_too_large"),
        (request("GET", "/internal/health", headers=[f"X-H{i}: v" for i in range(MAX_HEADERS + 1)]), 400,
         "malformed_request"),
        (request("FROB", "/internal/health"), 400, "malformed_request"),
        (request("GET", b"/olla/llamacpp/\xff"), 400, "malformed_request"),
        (request("GET", b"/internal/health\x00"), 400, "malformed_request"),
        (request("GET", "/internal/health", headers=[b"X-Request-Id: \x01\x02"]), 400, "malformed_request"),
        (request("POST", CHAT_PATH, b"{}", ["Transfer-Encoding: chunked"]), 400, "malformed_request"),
        (request("POST", CHAT_PATH, headers=["Content-Length: -1"], content_length=False), 400, "malformed_request"),
        (b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
         "malformed_request"),
        (b"GET /internal/health HTTP/1.1\r\n\r\n", 400, "malformed_request"),  # no Host
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40, 400, "malformed_request"),  # TLS hello
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "malformed_request"),
    ],
)  # fmt: skip
async def test_what_the_parser_refuses_gets_a_json_4xx_and_no_error_log(router, caplog, data, status, code) -> None:
    caplog.set_level(logging.INFO)
    await refused(router, data, status, code)
    assert not errors_logged(caplog)
    assert any(r.name == "olla.server" and r.levelno == logging.INFO for r in caplog.records)
    assert (await send(router.port, request("GET", "/internal/health"))).status == 200


async def test_the_parsers_answer_never_echoes_the_client_bytes(router, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-client-secret-" + "x" * MAX_FIELD_SIZE
    answer = await send(router.port, request("GET", "/internal/health", headers=[f"Authorization: Bearer {secret}"]))
    assert answer.status == 431
    assert b"sk-client-secret" not in answer.body
    assert not [r for r in caplog.records if "sk-client-secret" in JsonFormatter().format(r)]


async def test_a_client_sending_its_headers_slowly_is_cut_off(start_sims) -> None:
    (sim,) = await start_sims(fast(decode_ms=10.0))
    async with serving([ep("a", sim)], head_timeout=0.3) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        started = time.monotonic()
        closed_after = None
        for byte in b"GET /internal/health HTTP/1.1\r\nHost: olla.test\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            try:
                if await asyncio.wait_for(reader.read(1), 0.05) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
        writer.close()
        assert closed_after is not None and 0.25 <= closed_after < 1.0, closed_after

        # An idle connection is closed by the same bound; a request may run far longer than it.
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        async with asyncio.timeout(2):
            assert await reader.read() == b""
        writer.close()
        started = time.monotonic()
        answer = await send(served.port, request("POST", CHAT_PATH, orjson.dumps(chat(tokens=60))))
        assert answer.status == 200 and time.monotonic() - started > 0.5
        assert answer.json()["usage"]["completion_tokens"] == 60


async def test_a_crash_in_a_handler_is_a_json_500_with_its_traceback_logged(caplog) -> None:
    async def crash(request: Request) -> Response:
        raise RuntimeError("a bug")

    server = await Server.start(crash, "127.0.0.1", 0)
    try:
        answer = await send(server.port, request("GET", "/crash"))
    finally:
        await server.stop()
    assert answer.status == 500 and answer.error["code"] == "internal_error"
    assert "a bug" not in answer.error["message"]
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info and isinstance(record.exc_info[1], RuntimeError)


# --- secrets -----------------------------------------------------------------------------


async def test_endpoint_headers_never_show_in_answers_status_metrics_or_logs(start_sims, caplog, access_lines) -> None:
    caplog.set_level(logging.DEBUG)
    secret, other = "Bearer sk-endpoint-secret-1", "sk-endpoint-secret-2"
    keyed, wrong = await start_sims(fast(api_key="sk-endpoint-secret-1"), fast(api_key="another-key"))
    endpoints = [ep("keyed", keyed, headers={"Authorization": secret, "X-Extra": other}),
                 ep("wrong", wrong, headers={"Authorization": "Bearer sk-endpoint-secret-3"})]  # fmt: skip
    seen: list[bytes] = []
    async with serving(endpoints, ready=1) as served:
        port = served.port

        async def ask(data: bytes) -> Answer:
            answer = await send(port, data)
            seen.append(repr(dict(answer.headers)).encode() + answer.body)
            return answer

        assert (await ask(request("POST", CHAT_PATH, orjson.dumps(chat())))).status == 200
        assert (await ask(request("POST", CHAT_PATH, orjson.dumps(chat(stream=True))))).status == 200
        await ask(request("POST", CHAT_PATH, orjson.dumps(chat("ghost"))))
        await ask(request("POST", CHAT_PATH, b"{broken"))
        await ask(request("GET", "/olla/llamacpp/" + "a" * MAX_LINE_SIZE))
        keyed.set_fault("status", status=503)
        await ask(request("POST", CHAT_PATH, orjson.dumps(chat())))
        keyed.set_fault("crash")
        await ask(request("POST", CHAT_PATH, orjson.dumps(chat())))
        # The endpoint that refuses olla's key fails discovery: its error is logged, never the key.
        failed = [("discovery failed", "wrong")]
        await until(lambda: any([(r.getMessage(), getattr(r, "endpoint", None))] == failed for r in caplog.records), 5)
        for path in ("/internal/status", "/internal/status/endpoints", "/internal/status/models", "/olla/models",
                     "/olla/llamacpp/v1/models", "/metrics", "/internal/health"):  # fmt: skip
            assert (await ask(request("GET", path))).status == 200
    text = b"\n".join(seen) + "\n".join(JsonFormatter().format(r) for r in caplog.records).encode()
    text += orjson.dumps(access_lines())
    assert b"answered 401" in text and b"upstream_error" in text  # the run met the errors it should
    assert b"sk-endpoint-secret" not in text


def test_a_client_string_in_a_log_line_cannot_forge_or_lose_the_line() -> None:
    record = logging.LogRecord("olla.access", logging.INFO, __file__, 1, "request", None, None)
    record.path = "/x\n12:00:00 ERROR   olla: forged"  # aiohttp decodes %0a in a path
    record.model = "\udcff"  # an undecodable byte as aiohttp keeps it
    text = TextFormatter().format(record)
    assert "\n" not in text and "path='/x\\n12:00:00 ERROR" in text
    line = JsonFormatter().format(record)
    assert "\n" not in line and orjson.loads(line.replace("\\udcff", "?"))["path"] == record.path


def test_the_access_log_keeps_a_client_string_on_its_line() -> None:
    fields = {"path": "/x\n12:00:00 ERROR   olla: forged", "model": "\udcff", "status": 200}
    for fmt in ("text", "json"):
        stream = io.StringIO()
        access = AccessLog()
        access.configure(stream, "info", fmt)
        access.write(fields)
        (line,) = stream.getvalue().splitlines()
        assert "olla.access" in line and "status" in line and "forged" in line, line
    assert orjson.loads(line.replace("\\udcff", "?"))["path"] == fields["path"]
    access.configure(stream, "warning", "json")
    access.write(fields)
    assert len(stream.getvalue().splitlines()) == 1  # below the configured level: not written
