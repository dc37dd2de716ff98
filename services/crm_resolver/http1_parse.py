"""An HTTP/1.1 response parser without I/O: bytes in, one bounded `Response` out.

What belongs here: the framing of one response to a request (RFC 9112): the status line, the
header fields, interim 1xx responses (skipped), the body by Content-Length, by chunked
transfer coding (trailers read and dropped), or until the connection ends, and whether the
connection may carry another request afterwards. What does not: sockets, time, pooling
(`http1`), and any meaning of the body (nothing is decompressed: Content-Encoding and
transfer codings other than chunked are left as they are).

Every buffer is bounded: a line of the head at most `MAX_LINE` bytes, at most `MAX_HEADERS`
fields, a head at most `MAX_HEAD` bytes, and a body at most the `max_body` the caller gives.
Anything that is not HTTP, or over a bound, raises `ProtocolError` (or `BodyTooLarge`, one of
them); their messages never quote the peer's bytes. A line may end in CRLF or a bare LF
(RFC 9112 §2.2 lets a recipient accept both); a CR anywhere else, a control character, a
folded line or a space before a field's colon is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LINE = 8192
"""Longest status line, header line or chunk-size line, without its line end."""
MAX_HEADERS = 100
"""Most header fields (or trailer fields) in one response."""
MAX_HEAD = 65536
"""Longest head (status line and fields) of one response, line ends included."""

_HEAD_END = re.compile(rb"\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")
# Controls but HTAB, and CR: a CR is only allowed right before LF, which splitting removes.
_BAD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_NO_BODY_STATUSES = frozenset({204, 304})

# The states of a parse.
_HEAD = 0
_FIXED = 1
_CHUNK_SIZE = 2
_CHUNK_DATA = 3
_CHUNK_DATA_END = 4
_TRAILERS = 5
_UNTIL_CLOSE = 6
_DONE = 7


class ProtocolError(Exception):
    """What the peer sent is not an HTTP/1.x response, or is over a bound."""


class BodyTooLarge(ProtocolError):
    """The body is (or declares itself) longer than the caller's `max_body`."""


class BrokenBody(ProtocolError):
    """The head was fine; the body is not: bad chunk framing, or cut short by the end of the
    connection."""


@dataclass(frozen=True, slots=True)
class Response:
    """One final (non-1xx) response. `headers` keep the peer's order and spelling."""

    status: int
    reason: str
    version: str
    """"HTTP/1.1" or "HTTP/1.0"."""
    headers: list[tuple[str, str]]
    keep_alive: bool
    """The server lets the connection carry another request once this body has ended."""
    content_length: int | None
    """The body's declared length; None when chunked, until close, or absent."""


class ResponseParser:
    """Parses the one response to one request; `feed` bytes, `feed_eof` at the end.

    `response` is set once the head of the final response is parsed (interim 1xx heads are
    dropped), and parsing stops there until `start_body`; `complete` once the body has
    ended; `body` holds the body read so far (at most `max_body` bytes); `extra` is whatever
    came after the end (a correct server sends nothing: a connection with extra bytes cannot
    be reused)."""

    __slots__ = (
        "_buffer",
        "_paused",
        "_remaining",
        "_searched",
        "_state",
        "_trailers",
        "body",
        "complete",
        "max_body",
        "received",
        "response",
    )

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.response: Response | None = None
        self.body = bytearray()
        self.complete = False
        self.received = 0
        """Bytes fed so far: zero means the peer has sent nothing at all."""
        self._buffer = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._searched = 0
        self._trailers = 0
        self._paused = False

    @property
    def extra(self) -> bytes:
        return bytes(self._buffer) if self.complete else b""

    def feed(self, data: bytes) -> None:
        """Take the next bytes from the connection; ProtocolError when they are not HTTP."""
        self.received += len(data)
        if self.complete:
            self._buffer += data
            return
        if self._state == _FIXED and not self._buffer and not self._paused:
            # The common case for a body: bytes straight into it, no copy through the buffer.
            self._fixed(data)
            return
        self._buffer += data
        self._advance()

    def start_body(self) -> None:
        """Go on past the head of the final response into its body, with the bytes already
        buffered: `feed` stops at that head so that the caller can look at it first (and
        need not read the body of a status it will not use). BodyTooLarge when the head
        declared a Content-Length over `max_body`."""
        if not self._paused:
            return
        self._paused = False
        assert self.response is not None
        length = self.response.content_length
        if length is not None and length > self.max_body:
            raise BodyTooLarge(f"Content-Length over {self.max_body} bytes")
        self._advance()

    def feed_eof(self) -> None:
        """The connection ended. A body read until close ends here; anything else that is
        not complete raises ProtocolError (a status line cut short is an empty answer: the
        caller tells that case apart by `response` being None)."""
        if self.complete:
            return
        if self._state == _UNTIL_CLOSE:
            self._finish()
            return
        if self.response is None:
            raise ProtocolError("connection closed before a complete status line and headers")
        raise BrokenBody("connection closed before the end of the body")

    def _advance(self) -> None:
        while not self.complete and not self._paused:
            state = self._state
            if state == _HEAD:
                if not self._head():
                    return
            elif state == _FIXED:
                data = bytes(self._buffer)
                self._buffer.clear()
                self._fixed(data)
                return
            elif state == _CHUNK_SIZE:
                if not self._chunk_size():
                    return
            elif state == _CHUNK_DATA:
                if not self._buffer:
                    return
                take = self._buffer[: self._remaining]
                del self._buffer[: len(take)]
                self._add_body(take)
                self._remaining -= len(take)
                if self._remaining == 0:
                    self._state = _CHUNK_DATA_END
            elif state == _CHUNK_DATA_END:
                buffer = self._buffer
                if buffer[:1] == b"\n":
                    del buffer[:1]
                elif buffer[:2] == b"\r\n":
                    del buffer[:2]
                elif not buffer or buffer == b"\r":
                    return
                else:
                    raise BrokenBody("chunk data not followed by a line end")
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                if not self._trailer_line():
                    return
            elif state == _UNTIL_CLOSE:
                data = bytes(self._buffer)
                self._buffer.clear()
                self._add_body(data)
                return
            else:  # pragma: no cover - _DONE sets complete
                return

    # --- the head --------------------------------------------------------------------------

    def _head(self) -> bool:
        """Parse one head if the buffer holds it all; False to wait for more bytes."""
        buffer = self._buffer
        found = _HEAD_END.search(buffer, max(0, self._searched - 2))
        if found is None:
            last_line_end = buffer.rfind(b"\n")
            if len(buffer) - last_line_end - 1 > MAX_LINE + 1:
                raise ProtocolError(f"a line of the head is over {MAX_LINE} bytes")
            if len(buffer) > MAX_HEAD:
                raise ProtocolError(f"the head is over {MAX_HEAD} bytes")
            self._searched = len(buffer)
            return False
        end = found.end()
        if end > MAX_HEAD:
            raise ProtocolError(f"the head is over {MAX_HEAD} bytes")
        head = bytes(buffer[: found.start()])
        del buffer[:end]
        self._searched = 0
        lines = head.split(b"\n")
        if len(lines) > MAX_HEADERS + 1:
            raise ProtocolError(f"more than {MAX_HEADERS} header fields")
        for index, line in enumerate(lines):
            if line[-1:] == b"\r":
                line = lines[index] = line[:-1]
            if len(line) > MAX_LINE:
                raise ProtocolError(f"a line of the head is over {MAX_LINE} bytes")
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None or _BAD_BYTE.search(lines[0]):
            raise ProtocolError("not an HTTP/1.x status line")
        status = int(status_line[2])
        headers = _fields(lines[1:])
        if status < 200:
            if status == 101:
                raise ProtocolError("101 Switching Protocols was not asked for")
            return True  # an interim response (100 Continue, 103 Early Hints): skipped
        self._begin(status, status_line, headers)
        return True

    def _begin(
        self, status: int, status_line: re.Match[bytes], headers: list[tuple[str, str]]
    ) -> None:
        minor = status_line[1]
        version = "HTTP/1.1" if minor == b"1" else "HTTP/1.0"
        connection = ""
        transfer_encoding: str | None = None
        lengths: set[str] = set()
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                lengths.update(part.strip() for part in value.split(","))
            elif lowered == "transfer-encoding":
                transfer_encoding = (
                    value if transfer_encoding is None else f"{transfer_encoding}, {value}"
                )
            elif lowered == "connection":
                connection = f"{connection},{value}" if connection else value
        tokens = {token.strip().lower() for token in connection.split(",")} if connection else ()
        keep_alive = "close" not in tokens and (minor == b"1" or "keep-alive" in tokens)
        length: int | None = None
        if status in _NO_BODY_STATUSES:
            state = _DONE
        elif transfer_encoding is not None:
            # Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); a coding list that
            # does not end in chunked is read until close.
            codings = [c.strip().lower() for c in transfer_encoding.split(",") if c.strip()]
            if codings and codings[-1] == "chunked":
                state = _CHUNK_SIZE
            else:
                state, keep_alive = _UNTIL_CLOSE, False
            if lengths:
                keep_alive = False  # both framings: never trust the connection again
        elif lengths:
            if len(lengths) != 1:
                raise ProtocolError("conflicting Content-Length values")
            (text,) = lengths
            if not (text.isascii() and text.isdigit()) or len(text) > 18:
                raise ProtocolError("Content-Length is not a number")
            length = int(text)
            state, self._remaining = (_FIXED, length) if length else (_DONE, 0)
        else:
            state, keep_alive = _UNTIL_CLOSE, False
        self.response = Response(
            status=status,
            reason=(status_line[3] or b"").decode("latin-1"),
            version=version,
            headers=headers,
            keep_alive=keep_alive,
            content_length=length,
        )
        self._state = state
        if state == _DONE:
            self._finish()
        else:
            self._paused = True

    # --- bodies ----------------------------------------------------------------------------

    def _fixed(self, data: bytes) -> None:
        remaining = self._remaining
        if len(data) >= remaining:
            self.body += data[:remaining]
            self._buffer += data[remaining:]
            self._remaining = 0
            self._finish()
        else:
            self.body += data
            self._remaining = remaining - len(data)

    def _add_body(self, data: bytes | bytearray) -> None:
        if len(self.body) + len(data) > self.max_body:
            raise BodyTooLarge(f"body over {self.max_body} bytes")
        self.body += data

    def _chunk_size(self) -> bool:
        line = self._line()
        if line is None:
            return False
        size = line.split(b";", 1)[0].strip(b" \t")
        if not size or len(size) > 16 or not _HEX.issuperset(size):
            raise BrokenBody("not a chunk size")
        self._remaining = int(size, 16)
        if self._remaining == 0:
            self._state = _TRAILERS
        else:
            if len(self.body) + self._remaining > self.max_body:
                raise BodyTooLarge(f"body over {self.max_body} bytes")
            self._state = _CHUNK_DATA
        return True

    def _trailer_line(self) -> bool:
        line = self._line()
        if line is None:
            return False
        if not line:
            self._finish()
            return True
        self._trailers += 1
        if self._trailers > MAX_HEADERS:
            raise BrokenBody(f"more than {MAX_HEADERS} trailer fields")
        try:
            _fields([line])  # checked, then dropped: nothing here uses trailers
        except ProtocolError as exc:
            raise BrokenBody(str(exc)) from None
        return True

    def _line(self) -> bytes | None:
        """The next line of the buffer without its line end, or None until it has come."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_LINE + 1:
                raise BrokenBody(f"a chunk line is over {MAX_LINE} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if line[-1:] == b"\r":
            line = line[:-1]
        if len(line) > MAX_LINE:
            raise BrokenBody(f"a chunk line is over {MAX_LINE} bytes")
        return line

    def _finish(self) -> None:
        self._state = _DONE
        self.complete = True


def _fields(lines: list[bytes]) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        field = _FIELD.fullmatch(line)
        if field is None or _BAD_BYTE.search(line) or b"\r" in line:
            # Also a folded line (it starts with white space) and a space before the colon.
            raise ProtocolError("not an HTTP header field")
        headers.append((field[1].decode("ascii"), field[2].decode("latin-1")))
    return headers
