"""Test helper: a real HTTP server on 127.0.0.1 (in a thread) serving images and each way a download fails."""
from __future__ import annotations

import contextlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def image_server(files: Dict[str, bytes]) -> Iterator[str]:
    """Serves ``files`` by path (``/name``); ``/slow/<name>`` answers after 3 s; anything else is a 404.
    Yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path
            if path.startswith("/slow/"):
                time.sleep(3)
                path = path[len("/slow"):]
            body = files.get(path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            try:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
