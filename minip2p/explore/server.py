"""The attention explorer: a local web page where a prompt meets its image (`minip2p explore`).

    page ── POST /api/run {"prompt": …, "edits": […], "seed": …} ──> `check_request` (a bad field
         <── 202 {"id": 3, "ahead": 1}                                is one line, HTTP 400)
         ── GET /api/jobs/3 (every ¼ s) ──> {"state": "queued"|"running"|"done"|"error", "ahead",
         <──                                 "step", "steps", "result" or "error"}
         ── GET /out/3-x0-5-1.png ──> a PNG in the output folder, nothing else

One worker thread runs the jobs, in the order they came (`Explorer`); the HTTP server answers
every request on its own thread (the standard library's ThreadingHTTPServer), so the page keeps
polling while a job denoises. A job (`run_job`) is the sampling loop of pipeline.py driven step by
step: after each step the x̂₀ the step used is decoded (DDIM.x0_between) and the store keeps
that step's coarse cross-attention maps (AttentionStore(step_pixels=…)). The result holds image
URLs and the maps as numbers (rows × cols, max 1); the page draws them as heat over the images.

Safety: the server reads only its page (package data) and the PNGs it wrote into its output
folder (names it made, checked against a pattern; no path from a request is joined to a folder),
writes only there, takes request bodies up to MAX_BODY bytes, and binds to loopback unless told.
"""
from __future__ import annotations

import json
import queue
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import torch

from ..errors import MinipError
from .requests import FILE_NAME, KEEP_JOBS, MAX_BODY, MAX_QUEUE, BadRequest, Request, check_request

# the limits, request checking and the controller: explore_request.py


# --------------------------------------------------------------------------------- one job

@dataclass
class Job:
    id: int
    request: Request
    control: object = field(repr=False)
    store: object = field(repr=False)
    state: str = "queued"                 # queued -> running -> done | error
    step: int = 0
    error: str | None = None
    result: dict | None = None
    files: list = field(default_factory=list)

    def view(self, ahead: int) -> dict:
        out = {"id": self.id, "state": self.state, "step": self.step,
               "steps": self.request.steps, "ahead": ahead}
        if self.error:
            out["error"] = self.error
        if self.result:
            out["result"] = self.result
        return out


def _values(t: torch.Tensor) -> list:
    """A tensor as nested lists of numbers with 3 decimals (what the page draws)."""
    return (t.float() * 1000).round().div(1000).tolist()


def _unit(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Each map (along `dim`) divided by its max."""
    return t / t.amax(dim=dim, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def run_job(model, job: Job, out_dir: Path):
    """Denoise, decoding x̂₀ after every step; then the maps. Fills job.step and job.result."""
    from .. import views
    from ..pipeline import decode, encode_text, initial_noise, sample, to_pil
    r, store, tok = job.request, job.store, model.tokenizer
    start = time.perf_counter()

    def save(image, *parts) -> str:
        name = "-".join(map(str, (job.id, *parts))) + ".png"
        image.save(out_dir / name)
        job.files.append(out_dir / name)
        return f"/out/{name}"

    cond, uncond = encode_text(model, r.prompts), encode_text(model, [""])
    z = initial_noise(model, r.seed, r.height, r.width).expand(len(r.prompts), -1, -1, -1)
    x0_urls = []
    for i, t, z_next in sample(model, cond, uncond, z, r.steps, r.guidance, job.control,
                               progress=False):
        x0 = model.scheduler.x0_between(z.to(z_next), z_next, t, r.steps)
        x0_urls.append([save(im, "x0", i, b) for b, im in enumerate(to_pil(decode(model, x0)))])
        z, job.step = z_next, i + 1
    images = to_pil(decode(model, z))
    # Every token's map (start, the prompt's tokens, end): averaged over steps, and per step.
    pixels = store.coarsest("cross")
    rows, cols = views._shape(pixels, images[0])
    tokens = [tok.token_strings(p)[:min(len(tok.tokenize(p)) + 2, 77)] for p in r.prompts]
    final = store.average("cross", pixels)                                 # (B, pixels, 77)
    maps = [_values(_unit(final[b][:, :len(n)].T)) for b, n in enumerate(tokens)]
    per_step = [[_values(_unit(store.at_step(i, pixels)[b][:, :len(n)].T))
                 for b, n in enumerate(tokens)] for i in range(r.steps)]
    # Self-attention SVD components, min-max to [0, 1].
    self_pixels = store.coarsest("self")
    s_rows, s_cols = views._shape(self_pixels, images[0])
    comps = []
    for b in range(len(r.prompts)):
        c, _ = views.self_components(store, b, 6, self_pixels)
        c = c - c.amin(1, keepdim=True)
        comps.append(_values(_unit(c)))
    # DAAM word heat maps at the latent size.
    f = model.vae.cfg.downscale
    size = (r.height // f, r.width // f)
    heat = [views.word_heat(store, tok, p, b, size) for b, p in enumerate(r.prompts)]
    job.result = {
        "prompts": r.prompts,
        "images": [save(im, "image", b) for b, im in enumerate(images)],
        "x0": x0_urls,                                         # [step][prompt]
        "tokens": tokens,                                      # [prompt][token]
        "maps": {"rows": rows, "cols": cols, "final": maps,    # [prompt][token][pixel]
                 "steps": per_step},                           # [step][prompt][token][pixel]
        "svd": {"rows": s_rows, "cols": s_cols, "components": comps},   # [prompt][n][pixel]
        "words": {"rows": size[0], "cols": size[1],                     # [prompt][word]
                  "maps": [[{"word": w, "map": _values(m.flatten())} for w, m in h]
                           for h in heat]},
        "seconds": round(time.perf_counter() - start, 2),
    }


# ------------------------------------------------------------------------ the queue of jobs

class Explorer:
    """The jobs and the one worker thread that runs them in order."""

    def __init__(self, model, out_dir: Path | None = None):
        self.model = model
        self.temporary = out_dir is None
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="minip2p-explore-")).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.next_id = 1
        self.finished: list[int] = []                           # job ids, in the order done
        self.worker = threading.Thread(target=self._work, name="explore-worker", daemon=True)
        self.worker.start()

    def submit(self, body: dict) -> Job:
        request, control, store = check_request(self.model, body)
        with self.lock:
            if sum(j.state == "queued" for j in self.jobs.values()) >= MAX_QUEUE:
                raise BadRequest(503, f"{MAX_QUEUE} jobs are waiting already; try again soon")
            job = Job(self.next_id, request, control, store)
            self.jobs[job.id] = job
            self.next_id += 1
            self.queue.put(job)
        return job

    def ahead(self, job: Job) -> int:
        """How many jobs run or wait before this one."""
        with self.lock:
            return sum(j.state in ("queued", "running") and j.id < job.id
                       for j in self.jobs.values())

    def _work(self):
        while (job := self.queue.get()) is not None:
            job.state = "running"
            try:
                run_job(self.model, job, self.out_dir)
                job.state = "done"
            except MinipError as e:
                job.error, job.state = str(e), "error"
            except Exception as e:                           # keep serving; say what happened
                job.error, job.state = f"the job failed: {type(e).__name__}: {e}", "error"
            job.control = job.store = None                   # the maps live on in job.result
            with self.lock:
                self.finished.append(job.id)
                self._forget_old()

    def _forget_old(self):
        """Drop the files and results of all but the last KEEP_JOBS finished jobs."""
        for old in self.finished[:-KEEP_JOBS]:
            job = self.jobs.pop(old, None)
            for path in job.files if job else []:
                path.unlink(missing_ok=True)
        del self.finished[:-KEEP_JOBS]

    def file(self, name: str) -> Path | None:
        """The PNG called `name` in the output folder, or None. Only names the server makes."""
        if not FILE_NAME.fullmatch(name):
            return None
        path = (self.out_dir / name).resolve()
        return path if path.parent == self.out_dir and path.is_file() else None

    def close(self):
        self.queue.put(None)
        self.worker.join(timeout=60)
        if self.temporary:
            shutil.rmtree(self.out_dir, ignore_errors=True)


# ------------------------------------------------------------------------------- HTTP

PAGE = "page.html"


class Handler(BaseHTTPRequestHandler):
    """GET /, /api/jobs/ID, /out/NAME.png; POST /api/run. Errors: JSON {"error": one line}."""
    server_version = "minip2p-explore"
    explorer: Explorer                    # set by `make_server`
    page: bytes
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
        if urlsplit(self.path).path != "/api/run":
            return self._error(404, "POST goes to /api/run")
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
                out_dir: Path | None = None, quiet: bool = True):
    """A ThreadingHTTPServer for the explorer (not yet serving: call serve_forever) and its
    Explorer (close it after shutting the server down)."""
    explorer = Explorer(model, out_dir)
    page = resources.files("minip2p.explore").joinpath(PAGE).read_bytes()
    handler = type("ExploreHandler", (Handler,), {"explorer": explorer, "page": page,
                                                  "quiet": quiet})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        explorer.close()
        raise MinipError(f"cannot serve on {host}:{port}: {e.strerror or e}; try another "
                         "port") from None
    server.daemon_threads = True
    return server, explorer

