"""A real HTTP server on 127.0.0.1, in a thread, that can fail its first requests on purpose."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Served:
    """What the server serves and how it misbehaves; ``requests`` records each request's path."""

    files: dict[str, bytes]
    faults: list[str] = field(default_factory=list)
    """One per request, in order, until used up: an HTTP status ("503", "429"), or "truncate" (half the body)."""
    requests: list[str] = field(default_factory=list)
    """The path of each GET."""
    heads: list[str] = field(default_factory=list)
    """The path of each HEAD (a client asking whether a file changed)."""
    head_allowed: bool = True
    """False: HEAD is answered 405, as some servers do."""
    base_url: str = ""

    def url(self, path: str) -> str:
        """The full URL of ``path`` on this server."""
        return f"{self.base_url}{path}"


def etag(body: bytes) -> str:
    """The ETag the server gives ``body``: a digest of it, as many servers do."""
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


def _handler(served: Served) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 (the name http.server calls)
            served.heads.append(self.path)
            body = served.files.get(self.path)
            if not served.head_allowed:
                self.send_error(405)
            elif body is None:
                self.send_error(404)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag(body))
                self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            served.requests.append(self.path)
            fault = served.faults.pop(0) if served.faults else None
            body = served.files.get(self.path)
            if fault is not None and fault.isdigit():
                self.send_error(int(fault))
            elif body is None:
                self.send_error(404)
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag(body))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if fault == "truncate" else body)
                if fault == "truncate":
                    self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            pass  # keep test output clean

    return Handler


@contextmanager
def serve(files: dict[str, bytes], *, faults: list[str] | None = None) -> Iterator[Served]:
    """Serve ``files`` (path -> bytes) on 127.0.0.1 until the block ends."""
    served = Served(files, list(faults or []))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
