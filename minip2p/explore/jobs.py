"""The explorer's jobs: a checked Request run by `methods.run` (or, for a prompt alone, the plain
sampling loop beside a store), then its images and views written out for the page; and the one
worker thread that runs the jobs in the order they came (`Explorer`).

A job's result holds image URLs and, where the method keeps an AttentionStore, the maps as
numbers (rows × cols, max 1) that the page draws as heat over the images: every token's map
averaged over the steps, each step's maps and predicted x̂₀ (for runs from noise), the
self-attention SVD components and the DAAM word maps. A method without a store gives images only.
Progress: a forward pre-hook on the UNet reads the `step` each denoising call carries. The
warnings a job raises (a prompt longer than the text encoder's window …) go back with its status.
"""
from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MinipError
from .requests import (FILE_NAME, KEEP_JOBS, MAX_QUEUE, BadRequest, Request, check_request,
                       hint_controls)


@dataclass
class Job:
    id: int
    request: Request
    state: str = "queued"                 # queued -> running -> done | error
    step: int = 0
    error: str | None = None
    result: dict | None = None
    files: list = field(default_factory=list)
    warnings: list = field(default_factory=list)      # one line each, e.g. a prompt cut short

    def view(self, ahead: int) -> dict:
        out = {"id": self.id, "state": self.state, "step": self.step,
               "steps": self.request.steps, "method": self.request.method, "ahead": ahead}
        if self.error:
            out["error"] = self.error
        if self.warnings:
            out["warnings"] = self.warnings
        if self.result:
            out["result"] = self.result
        return out


def _values(t: torch.Tensor) -> list:
    """A tensor as nested lists of numbers with 3 decimals (what the page draws)."""
    return (t.float() * 1000).round().div(1000).tolist()


def _unit(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Each map (along `dim`) divided by its max."""
    return t / t.amax(dim=dim, keepdim=True).clamp_min(1e-12)


def _look(model, r: Request):
    """A prompt alone: its image, with a store of every step's maps and x̂₀."""
    from .. import views
    from ..control import AttentionStore
    from ..methods.base import Result
    from ..pipeline import X0Recorder, generate, initial_noise, to_pil
    from ..conditioning import conditioned
    s = r.settings
    model = conditioned(model, s.get("controls"))
    store = AttentionStore(1, step_pixels=views.coarse_pixels(model, s["height"], s["width"]))
    z_T = initial_noise(model, s["seed"], s["height"], s["width"])
    x0 = X0Recorder(model, z_T, s["steps"])
    out = generate(model, r.prompts, s["seed"], s["steps"], s["guidance"], s["height"],
                   s["width"], control=store, latents=z_T, callback=x0, progress=False)
    return Result(to_pil(out), list(r.prompts), store=store, x0=x0)


def maps_of(model, store, prompts: list[str], image) -> dict:
    """The store's views for the page: tokens, cross maps (final and per step), SVD, words."""
    from .. import views
    tok = model.tokenizer
    pixels = store.coarsest("cross")
    if pixels is None:
        return {}
    rows, cols = views._shape(pixels, image)
    tokens = [tok.token_strings(p)[:min(len(tok.tokenize(p)) + 2, 77)] for p in prompts]
    final = store.average("cross", pixels)                                 # (B, pixels, 77)
    maps = [_values(_unit(final[b][:, :len(n)].T)) for b, n in enumerate(tokens)]
    steps = sorted(getattr(store, "per_step", None) or {}) if store.step_pixels else []
    per_step = [[_values(_unit(store.at_step(i, pixels)[b][:, :len(n)].T))
                 for b, n in enumerate(tokens)] for i in steps]
    out = {"tokens": tokens,                                                # [prompt][token]
           "maps": {"rows": rows, "cols": cols, "final": maps,      # [prompt][token][pixel]
                    "steps": per_step}}                             # [step][prompt][token][pixel]
    self_pixels = store.coarsest("self")
    if self_pixels:                                  # self-attention SVD components, in [0, 1]
        s_rows, s_cols = views._shape(self_pixels, image)
        comps = []
        for b in range(len(prompts)):
            c, _ = views.self_components(store, b, 6, self_pixels)
            comps.append(_values(_unit(c - c.amin(1, keepdim=True))))
        out["svd"] = {"rows": s_rows, "cols": s_cols, "components": comps}  # [prompt][n][pixel]
    f = model.vae.cfg.downscale                      # DAAM word heat maps at the latent size
    size = (image.height // f, image.width // f)
    heat = [views.word_heat(store, tok, p, b, size) for b, p in enumerate(prompts)]
    out["words"] = {"rows": size[0], "cols": size[1],                       # [prompt][word]
                    "maps": [[{"word": w, "map": _values(m.flatten())} for w, m in h]
                             for h in heat]}
    return out


def run_job(model, job: Job, out_dir: Path):
    """Run the request's method; write its pictures; fill job.result."""
    from .. import methods
    r = job.request
    start = time.perf_counter()

    def save(image, *parts) -> str:
        name = "-".join(map(str, (job.id, *parts))) + ".png"
        image.save(out_dir / name)
        job.files.append(out_dir / name)
        return f"/out/{name}"

    with warnings.catch_warnings(record=True) as caught:      # the job's own warnings, each
        warnings.simplefilter("always")                       # once, go back with its status
        try:
            res = _look(model, r) if r.look else \
                methods.run(model, r.method, r.prompts, **r.settings, **r.params)
            if r.settings.get("controls"):                # the hint the nets saw (canny preview)
                res.inputs = [*res.inputs, _hint_picture(r.settings["controls"][0])]
        finally:
            job.warnings = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
    with torch.no_grad():
        result = _result(model, job, res, save)
    result["seconds"] = round(time.perf_counter() - start, 2)
    job.result = result


def _hint_picture(control):
    """A Control's (first) hint as a PIL image."""
    from PIL import Image
    hint = control.hint[0]                                       # (3, H, W) in [0, 1]
    return Image.fromarray((hint.permute(1, 2, 0) * 255).round().byte().numpy())


def _result(model, job: Job, res, save) -> dict:
    """The method's Result as the page reads it: image URLs, then the store's views."""
    from ..pipeline import decode, to_pil
    r = job.request
    latents = res.x0.x0 if hasattr(res.x0, "x0") else (res.x0 or [])   # [step] (B, 4, h, w)
    result = {
        "method": r.method, "prompts": res.labels,
        "images": [save(im, "image", b) for b, im in enumerate(res.images)],
        "inputs": [save(im, "input", k) for k, im in enumerate(res.inputs)],
        "x0": [[save(im, "x0", i, b) for b, im in enumerate(to_pil(decode(model, z)))]
               for i, z in enumerate(latents)],                            # [step][prompt]
        "tokens": [], "maps": None, "svd": None, "words": None,
    }
    if res.store is not None:
        rows = res.store.B
        prompts = res.labels[:rows] if len(res.labels) >= rows else r.prompts[:rows]
        result.update(maps_of(model, res.store, prompts, res.images[0]))
    return result


class Explorer:
    """The jobs and the one worker thread that runs them in order."""

    def __init__(self, model, out_dir: Path | None = None, controlnets=()):
        self.model, self.controlnets = model, list(controlnets)
        self.temporary = out_dir is None
        self.made = out_dir is not None and not Path(out_dir).exists()    # ours to remove if empty
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="minip2p-explore-")).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.next_id = 1
        self.finished: list[int] = []                           # job ids, in the order done
        self.running: Job | None = None
        self.hook = model.unet.register_forward_pre_hook(self._progress, with_kwargs=True) \
            if isinstance(model.unet, torch.nn.Module) else None
        self.worker = threading.Thread(target=self._work, name="explore-worker", daemon=True)
        self.worker.start()

    def _progress(self, module, args, kwargs):
        """Each denoising call of the UNet names its step: the running job is at step + 1."""
        job, step = self.running, kwargs.get("step")
        if job is not None and isinstance(step, int):
            job.step = min(step + 1, job.request.steps)

    def submit(self, body: dict) -> Job:
        request = check_request(self.model, body, self.controlnets)
        with self.lock:
            if sum(j.state == "queued" for j in self.jobs.values()) >= MAX_QUEUE:
                raise BadRequest(503, f"{MAX_QUEUE} jobs are waiting already; try again soon")
            job = Job(self.next_id, request)
            self.jobs[job.id] = job
            self.next_id += 1
            self.queue.put(job)
        return job

    def preview(self, body: dict) -> str:
        """POST /api/hint: the hint a run with this picture gives the nets, at the model's native
        size, as a PNG data URL (the canny preview)."""
        import base64
        import io
        side = self.model.unet.cfg.sample_size * self.model.vae.cfg.downscale
        controls = hint_controls(body, self.controlnets, side, side).get("controls")
        if not controls:
            raise MinipError("hint: give a picture")
        buf = io.BytesIO()
        _hint_picture(controls[0]).save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def ahead(self, job: Job) -> int:
        """How many jobs run or wait before this one."""
        with self.lock:
            return sum(j.state in ("queued", "running") and j.id < job.id
                       for j in self.jobs.values())

    def _work(self):
        while (job := self.queue.get()) is not None:
            job.state, self.running = "running", job
            try:
                run_job(self.model, job, self.out_dir)
                job.state = "done"
            except MinipError as e:
                job.error, job.state = " ".join(str(e).split()), "error"
            except Exception as e:                           # keep serving; say what happened
                job.error = " ".join(f"the job failed: {type(e).__name__}: {e}".split())
                job.state = "error"
            self.running = None
            job.request.settings.pop("image", None)          # the picture lives on as a file
            job.request.settings.pop("controls", None)       # and the hint
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
        if self.hook is not None:
            self.hook.remove()
        if self.temporary:
            shutil.rmtree(self.out_dir, ignore_errors=True)
        elif self.made and not any(self.out_dir.iterdir()):    # e.g. the server could not bind
            self.out_dir.rmdir()
