"""A local HTTP server that records every request: a test helper, not a test.

It exists so the media fetcher's guards (SSRF refusals, redirects, byte caps, timeouts) can be tested
against a real socket without anything leaving the machine: a test points the fetcher or the server
at a `Recorder` and then asserts on what it was asked for (`hits`) and on how a streamed answer ended
(`sent`, `cut_off`). tests/test_media.py (the fetcher in-process) and tests/test_reliability.py (the
real server) share this one implementation; tests/conftest.py wraps it in the `target`, `target6` and
`public_server` fixtures.

Routes (anything else is a 404):
- `/img`: `FAKE_IMAGE`, a few bytes that only look like a PNG (for the fetcher, which never decodes).
- `/image...`: `png_image()`, a real 32x32 PNG (for the server, which does decode).
- `/big`, `/big-undeclared`: 5000 bytes, with and without a Content-Length.
- `/redirect...`: 302 to the server's `redirect_to`; `/hop...`: 302 to `/redirect`; `/loop...`: 302
  to itself.
- `/drip...`: one byte every 0.2 s, never idle long enough for a read timeout.
- `/stall...`: headers, then silence.
- `/flood-declared...`, `/flood...`: up to `FLOOD_LIMIT` bytes, with and without a Content-Length.
"""

from __future__ import annotations

import functools
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KiB, MiB = 1024, 1024 * 1024
FAKE_IMAGE = b"\x89PNG pretend image"
FLOOD_LIMIT = 64 * MiB
BIG_BYTES = 5000
STREAM_FOR_S = 20.0  # the longest a drip, stall or flood keeps going when nobody hangs up


@functools.cache
def png_image() -> bytes:
    """The real PNG served at `/image...` (built on first use: numpy and PIL stay out of conftest)."""
    from tests.server_process import image_bytes

    return image_bytes(32, 32, seed=5)


class Recorder(ThreadingHTTPServer):
    """A local HTTP server that records every request and can drip, stall, flood or redirect.

    `host` is an IPv4 or IPv6 address; IPv6 may be bracketed (`[::1]`), as it appears in `base`.
    """

    daemon_threads = True

    def __init__(self, host: str) -> None:
        bare = host.strip("[]")
        if ":" in bare:
            self.address_family = socket.AF_INET6
        super().__init__((bare, 0), _RecorderHandler)
        self.hits: list[str] = []  # every request's path, in order
        self.sent: dict[str, int] = {}  # bytes written per streaming path before the client left
        self.cut_off: dict[str, bool] = {}  # per streaming path: did the client hang up first?
        self.redirect_to = ""
        self.host = host

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.server_address[1]}"

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _RecorderHandler(BaseHTTPRequestHandler):
    server: Recorder
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.path
        self.server.hits.append(path)
        if path == "/img":
            self._reply(200, FAKE_IMAGE, {"Content-Length": str(len(FAKE_IMAGE))})
        elif path.startswith("/image"):
            image = png_image()
            self._reply(200, image, {"Content-Type": "image/png", "Content-Length": str(len(image))})
        elif path == "/big":
            self._reply(200, b"x" * BIG_BYTES, {"Content-Length": str(BIG_BYTES)})
        elif path == "/big-undeclared":  # no Content-Length: the body ends when the socket closes
            self._reply(200, b"x" * BIG_BYTES, {})
        elif path.startswith("/redirect"):
            self._reply(302, b"", {"Location": self.server.redirect_to, "Content-Length": "0"})
        elif path.startswith("/hop"):
            self._reply(302, b"", {"Location": "/redirect", "Content-Length": "0"})
        elif path.startswith("/loop"):
            self._reply(302, b"", {"Location": "/loop", "Content-Length": "0"})
        elif path.startswith("/drip"):  # one byte every 0.2 s: never idle long enough for a read timeout
            self._stream(path, {"Content-Length": "100000"}, b"x", pause_s=0.2)
        elif path.startswith("/stall"):  # headers, then silence
            self._stall(path)
        elif path.startswith("/flood-declared"):
            self._stream(path, {"Content-Length": str(FLOOD_LIMIT)}, bytes(64 * KiB))
        elif path.startswith("/flood"):  # no Content-Length: the body ends when the socket closes
            self._stream(path, {}, bytes(64 * KiB))
        else:
            self._reply(404, b"", {"Content-Length": "0"})

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, path: str, headers: dict[str, str], chunk: bytes, pause_s: float = 0.0) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        sent, deadline = 0, time.monotonic() + STREAM_FOR_S
        try:
            while sent < FLOOD_LIMIT and time.monotonic() < deadline:
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
                time.sleep(pause_s)
        except OSError:
            self.server.cut_off[path] = True
        else:
            self.server.cut_off[path] = False
        finally:
            self.server.sent[path] = sent

    def _stall(self, path: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.flush()
        deadline = time.monotonic() + STREAM_FOR_S
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.1)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):  # the client closed
                self.server.cut_off[path] = True
                return
        self.server.cut_off[path] = False


@contextmanager
def serve(host: str, tls: ssl.SSLContext | None = None) -> Iterator[Recorder]:
    """A `Recorder` on `host` (port chosen by the OS), answering in a thread until the block ends;
    with `tls`, it speaks HTTPS."""
    server = Recorder(host)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
