"""A request body as bytes, under olla.server: its framing (Content-Length or chunked) and its Content-Encoding.

Pure: no I/O, no asyncio. A broken framing raises MalformedRequest, an encoding
olla does not decode or a body that does not decode InvalidRequest, a decoded
body over the limit BodyTooLarge; no message repeats the client's bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from olla.errors import BodyTooLarge, InvalidRequest
from olla.wire import MAX_FIELD_SIZE, MAX_HEADERS, TOKEN, malformed

HEX_DIGITS = b"0123456789abcdefABCDEF"

# Where a body is.
DATA, DATA_END, SIZE, TRAILER, DONE = range(5)


class Body:
    """A body's framing, taken from the front of a buffer as it arrives; what follows it stays there.

    Content-Length, or chunked coding (its extensions ignored, its trailers dropped).
    A request's body here, and an endpoint's chunked answer in olla.http1: `fault`
    makes the exception for a broken framing (MalformedRequest by default). The
    data before a fault is taken first; the fault is raised by the next call, and
    by every later one.
    """

    __slots__ = ("_chunked", "_fault", "_left", "_state", "_trailers", "length")

    def __init__(self, length: int, chunked: bool, fault: Callable[[str], Exception] = malformed) -> None:
        self.length = length  # the Content-Length (0 when chunked)
        self._chunked = chunked
        self._fault = fault
        self._left = length  # bytes of the body, or of the current chunk, not taken yet
        self._state = SIZE if chunked else DATA if length else DONE
        self._trailers = 0

    @property
    def done(self) -> bool:
        return self._state == DONE

    def take(self, buffer: bytearray) -> bytes:
        """The body's bytes `buffer` holds now (b"" for none), taken out of it with their framing."""
        if not self._chunked:
            n = min(self._left, len(buffer))
            if not n:
                return b""
            data = bytes(buffer[:n])
            del buffer[:n]
            self._left -= n
            if not self._left:
                self._state = DONE
            return data
        pieces: list[bytes] = []
        try:
            self._chunks(buffer, pieces)
        except Exception:  # whatever `fault` makes
            if not pieces:
                raise  # else the data goes first: what broke stays in the buffer for the next call
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _chunks(self, buffer: bytearray, pieces: list[bytes]) -> None:
        while self._state != DONE:
            if self._state == DATA:
                n = min(self._left, len(buffer))
                if not n:
                    return
                pieces.append(bytes(buffer[:n]))
                del buffer[:n]
                self._left -= n
                if not self._left:
                    self._state = DATA_END
                continue
            if self._state == DATA_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise self._fault("invalid chunk: its data is not followed by CRLF")
                del buffer[:2]
                self._state = SIZE
                continue
            newline = buffer.find(b"\r\n")
            if newline < 0:
                if len(buffer) > MAX_FIELD_SIZE:
                    raise self._fault("invalid chunk: a size or trailer line is too long")
                return
            line = bytes(buffer[:newline])
            if self._state == TRAILER:
                if self._trailers >= MAX_HEADERS:
                    raise self._fault("invalid chunk: too many trailers")
                del buffer[: newline + 2]
                self._trailers += 1
                self._state = TRAILER if line else DONE
                continue
            size = line.partition(b";")[0].rstrip(b" \t")
            if not size or size.strip(HEX_DIGITS) or len(size) > 16:
                raise self._fault("invalid chunk size line")
            del buffer[: newline + 2]
            self._left = int(size, 16)
            self._state = DATA if self._left else TRAILER

    def discard(self, buffer: bytearray) -> bool:
        """Drop the rest of the body if all of it has arrived; False if it has not, or breaks its framing."""
        try:
            while not self.done and self.take(buffer):
                pass
        except Exception:  # noqa: BLE001 (a broken framing, whatever `fault` makes)
            return False
        return self.done


def decoder_for(encoding: str | None, limit: int) -> Decoder | None:
    """The decoder for a Content-Encoding value (None: the body is used as sent).

    Raises InvalidRequest for an encoding olla does not decode.
    """
    if encoding is None:
        return None
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip", "deflate"):
        return Decoder(name, limit)
    shown = name if len(name) <= 20 and not name.strip(TOKEN) else "of that kind"  # a long value may be a secret
    raise InvalidRequest(f"request body could not be read: olla does not decode Content-Encoding {shown}")


class Decoder:
    """A gzip or deflate body, decoded as it arrives; never more than `limit` decoded bytes are made.

    Deflate is zlib-wrapped by the standard, raw by some clients: its first two bytes tell which.
    """

    __slots__ = ("_limit", "_name", "_room", "_seen", "_start", "_zlib")

    def __init__(self, name: str, limit: int) -> None:
        self._name = "deflate" if name == "deflate" else "gzip"
        self._limit = limit
        self._room = limit  # decoded bytes still allowed
        self._zlib = zlib.decompressobj(31) if self._name == "gzip" else None
        self._start = b""  # deflate's first byte, held until the second tells the wrapping
        self._seen = False  # a byte has arrived (an empty body decodes to nothing)

    def feed(self, data: bytes) -> bytes:
        """The bytes `data` decodes to; raises BodyTooLarge past the limit, InvalidRequest if it does not decode."""
        if not data:
            return b""
        self._seen = True
        if self._zlib is None:
            data = self._start + data
            if len(data) < 2:
                self._start = data
                return b""
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._zlib = zlib.decompressobj(15 if wrapped else -15)
        pieces = []
        while data:
            try:
                piece = self._zlib.decompress(data, self._room + 1)
            except zlib.error:
                raise self._undecodable() from None
            if len(piece) > self._room:
                raise BodyTooLarge(f"request body exceeds the limit of {self._limit} bytes")
            self._room -= len(piece)
            pieces.append(piece)
            data = self._zlib.unused_data if self._zlib.eof else b""
            if data:
                if self._name != "gzip":
                    raise self._undecodable()
                self._zlib = zlib.decompressobj(31)  # the next gzip member
        return b"".join(pieces)

    def end(self) -> bytes:
        """b"" once the body has ended whole; raises InvalidRequest for one cut short."""
        if self._seen and (self._zlib is None or not self._zlib.eof):
            raise self._undecodable()
        return b""

    def _undecodable(self) -> InvalidRequest:
        return InvalidRequest(f"request body could not be read: the {self._name} body does not decode")
