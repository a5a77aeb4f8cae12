"""The attention explorer: a local web page where a prompt meets its image (`minip2p explore`).

    page ── GET /api/methods ──> every method: summary, whether it edits pictures, parameters
         ── POST /api/run {"method": …, "prompt": …, "edits": […], "params": {…}, "image": …}
           (started with --controlnet: also "hint": a picture, "hint_kind": "canny" or "hint",
            "control_scale": 1.0 -- the nets condition the run on it, requests.hint_controls;
            POST /api/hint with the same fields answers {"hint": the hint as a PNG data URL})
         <── 202 {"id": 3, "ahead": 1}        (a bad field: 4xx {"error": one line}, requests.py)
         ── GET /api/jobs/3 (every ¼ s) ──> {"state": "queued"|"running"|"done"|"error", "ahead",
         <──                                 "step", "steps", "result" or "error"}
         ── GET /out/3-x0-5-1.png ──> a PNG in the output folder, nothing else

One worker thread runs the jobs, in the order they came (`Explorer`, jobs.py); the HTTP server
answers every request on its own thread (the standard library's ThreadingHTTPServer), so the page
keeps polling while a job runs. A job runs its method through the registry (`methods.run`); the
result holds image URLs and, where the method keeps attention maps, the maps as numbers
(rows × cols, max 1) that the page draws as heat over the images.

Safety: the server reads only its page and script (package data) and the PNGs it wrote into its
output folder (names it made, checked against a pattern; no path from a request is joined to a
folder), writes only there, takes request bodies up to MAX_BODY bytes (an uploaded picture is
checked in picture.py), and binds to loopback unless told.
"""
from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import MinipError
from .jobs import Explorer
from .requests import KEEP_JOBS, MAX_BODY, BadRequest, describe_methods

__all__ = ["MAX_BODY", "Explorer", "Handler", "make_server"]

# ------------------------------------------------------------------------------- HTTP

PAGE, SCRIPT = "page.html", "form.js"


class Handler(BaseHTTPRequestHandler):
    """GET /, /form.js, /api/methods, /api/jobs/ID, /out/NAME.png; POST /api/run, /api/hint.
    Errors: JSON {"error": one line}."""
    server_version = "minip2p-explore"
    explorer: Explorer                    # set by `make_server`
    page: bytes
    script: bytes
    methods: bytes                        # GET /api/methods, JSON
    quiet = True

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, kind: str):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str):
        self._json(status, {"error": " ".join(str(message).split())})   # one line

    def do_GET(self):
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._send(200, self.page, "text/html; charset=utf-8")
        if path == "/" + SCRIPT:
            return self._send(200, self.script, "text/javascript; charset=utf-8")
        if path == "/api/methods":
            return self._send(200, self.methods, "application/json")
        if m := re.fullmatch(r"/api/jobs/([0-9]{1,9})", path):
            job = self.explorer.jobs.get(int(m.group(1)))
            if job is None:
                return self._error(404, f"no job {m.group(1)} (finished jobs are kept "
                                        f"{KEEP_JOBS} at a time)")
            return self._json(200, job.view(self.explorer.ahead(job)))
        if path.startswith("/out/"):
            file = self.explorer.file(path[len("/out/"):])
            if file is None:
                return self._error(404, "no such image")
            return self._send(200, file.read_bytes(), "image/png")
        self._error(404, f"no page {path[:80]!r}; the explorer is at /")

    do_HEAD = do_GET

    def do_POST(self):
        path = urlsplit(self.path).path
        if path not in ("/api/run", "/api/hint"):
            return self._error(404, "POST goes to /api/run (or /api/hint)")
        self.close_connection = True                   # no body left half-read on this socket
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "the request needs a Content-Length")
        if length < 0:
            return self._error(400, "a negative Content-Length")
        if length > MAX_BODY:
            return self._error(413, f"the request is {length} bytes; at most {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._error(400, f"malformed JSON: {e}")
        try:
            if path == "/api/hint":                        # the hint picture as the nets see it
                return self._json(200, {"hint": self.explorer.preview(body)})
            job = self.explorer.submit(body)
        except MinipError as e:
            return self._error(400, str(e))
        except BadRequest as e:
            return self._error(e.status, str(e))
        self._json(202, {"id": job.id, "ahead": self.explorer.ahead(job)})

    def _not_allowed(self):
        self._error(405, f"{self.command} is not used here; GET the page, POST /api/run")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


def make_server(model, host: str = "127.0.0.1", port: int = 7860,
                out_dir: Path | None = None, quiet: bool = True, controlnets=()):
    """A ThreadingHTTPServer for the explorer (not yet serving: call serve_forever) and its
    Explorer (close it after shutting the server down). `controlnets`: nets a request's hint
    picture conditions (the page then offers a hint upload)."""
    explorer = Explorer(model, out_dir, controlnets)
    files = resources.files("minip2p.explore")
    handler = type("ExploreHandler", (Handler,), {
        "explorer": explorer, "page": files.joinpath(PAGE).read_bytes(),
        "script": files.joinpath(SCRIPT).read_bytes(),
        "methods": json.dumps({**describe_methods(), "controlnets": len(controlnets)}).encode(),
        "quiet": quiet})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        explorer.close()
        raise MinipError(f"cannot serve on {host}:{port}: {e.strerror or e}; try another "
                         "port") from None
    server.daemon_threads = True
    return server, explorer

