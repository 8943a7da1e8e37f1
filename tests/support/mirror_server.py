"""A small HTTP file server on 127.0.0.1 for the download tests: Range/If-Range, and faults on demand.

Bounded: it serves only the files it is given, every socket has a timeout, and it shuts itself down after
`lifetime` seconds even if a test forgets to.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    path: str
    range: str | None
    if_range: str | None


@dataclass
class Mirror:
    """What the server serves and how it misbehaves. `faults` are used up one per request, in order."""

    files: dict[str, bytes]
    faults: list[str] = field(default_factory=list)  # "cut:N", "hangup", "500", "ignore-range", "" (none)
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'


def _handler(mirror: Mirror):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            mirror.requests.append(Request(self.path, self.headers.get("Range"), self.headers.get("If-Range")))
            fault = mirror.faults.pop(0) if mirror.faults else ""
            self.close_connection = True
            if fault == "hangup":
                return  # close without a response
            if fault == "500":
                self._send_status(500)
                return
            body = mirror.files.get(self.path)
            if body is None:
                self._send_status(404)
                return
            start = self._range_start(body, fault)
            if start is not None and start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            payload = body[start or 0 :]
            self.send_response(206 if start is not None else 200)
            if start is not None:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("ETag", mirror.etag(self.path))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if fault.startswith("cut:"):
                payload = payload[: int(fault[4:])]
            self.wfile.write(payload)
            self.wfile.flush()

        def _range_start(self, body: bytes, fault: str) -> int | None:
            requested = self.headers.get("Range")
            if not requested or fault == "ignore-range":
                return None
            if_range = self.headers.get("If-Range")
            if if_range and if_range != mirror.etag(self.path):
                return None  # the file changed: the whole of it, as RFC 9110 says
            return int(requested.removeprefix("bytes=").split("-")[0])

        def _send_status(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@contextmanager
def serve(files: dict[str, bytes], lifetime: float = 120.0) -> Iterator[Mirror]:
    """Serve `files` (URL path -> bytes) on an ephemeral port of 127.0.0.1 for the `with` block."""
    mirror = Mirror(dict(files))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mirror))
    server.daemon_threads = True
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    watchdog = threading.Timer(lifetime, server.shutdown)
    watchdog.daemon = True
    thread.start()
    watchdog.start()
    try:
        yield mirror
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
