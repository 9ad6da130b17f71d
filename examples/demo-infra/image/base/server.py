#!/usr/bin/env python3
"""The demo app: a tiny HTTP server (Python standard library only).

GET /        a page naming the image, the instance and the commit it was baked from
GET /healthz 200, or 500 when the image contains a file named `unhealthy` (to see a rollback)
"""
import html
import http.server
import os
import pathlib
import socketserver

HERE = pathlib.Path(__file__).resolve().parent


def baked_commit():
    """The commit this image was baked from (bake-dir writes it to .kiln-image)."""
    for line in read(".kiln-image").splitlines():
        if line.startswith("commit="):
            return line[len("commit="):] or "unknown"
    return "unknown"


def read(name, default=""):
    try:
        return (HERE / name).read_text().strip()
    except OSError:
        return default


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            healthy = not (HERE / "unhealthy").exists()
            self.reply(200 if healthy else 500, "ok\n" if healthy else "unhealthy\n", "text/plain")
            return
        image = os.environ.get("KILN_IMAGE", "?")
        body = (
            "<!doctype html><title>kiln demo</title>"
            f"<h1>{html.escape(read('message.txt', 'Hello from kiln'))}</h1>"
            f"<p>image <code>{html.escape(os.path.basename(image))}</code></p>"
            f"<p>instance <code>{html.escape(os.environ.get('KILN_INSTANCE_ID', '?'))}</code></p>"
            f"<p>commit <code>{html.escape(baked_commit()[:12])}</code></p>\n"
        )
        self.reply(200, body, "text/html; charset=utf-8")

    def reply(self, status, body, content_type):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Kiln-Image", os.path.basename(os.environ.get("KILN_IMAGE", "?")))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    Server(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Handler).serve_forever()
