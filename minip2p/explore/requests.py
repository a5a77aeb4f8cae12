"""The explorer's requests: the limits, every field of a POST /api/run body checked into a
`Request` (a bad field is one line: `BadRequest`, HTTP 400), and the controller a request asks for
(Prompt-to-Prompt or MasaCtrl beside a store that keeps each step's coarse cross maps).
The server, its job queue and the job itself are in explore.py."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .. import views
from ..errors import MinipError
from ..methods import masactrl

MAX_BODY = 64 * 1024          # bytes of a request body
MAX_STEPS = 100               # denoising steps of one job
MAX_SIDE = 1024               # image height and width, pixels
MAX_EDITS = 3                 # edited prompts beside the source
MAX_PROMPT = 400              # characters of a prompt
MAX_QUEUE = 20                # jobs waiting; more are refused (503) until some finish
KEEP_JOBS = 20                # finished jobs whose files stay in the output folder
FILE_NAME = re.compile(r"[0-9]+-(image|x0)(-[0-9]+)+\.png")        # what /out/ may serve


class BadRequest(Exception):
    """An HTTP error with a one-line reason (status 4xx/5xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------ the request, checked

@dataclass
class Request:
    prompts: list[str]                    # source first, then the edited prompts
    seed: int = 0
    steps: int = 10
    guidance: float = 7.5
    height: int = 0
    width: int = 0
    method: str = "p2p"                   # p2p | masactrl (with one or more edited prompts)
    mode: str = "auto"                    # P2P: auto | replace | refine
    cross: str = "0.8"                    # P2P cross-attention window τ_c (align.parse_window)
    self_: str = "0.4"                    # P2P self-attention window τ_s
    reweight: dict = field(default_factory=dict)      # P2P: {word of the edits: factor}
    blend: list = field(default_factory=list)         # P2P LocalBlend: one word per prompt
    masa_step: int = 4                    # MasaCtrl S
    masa_layer: int | None = None         # MasaCtrl L (None: the model's default)


def _number(body: dict, key: str, default, kind, low, high):
    """body[key] as an int or float within [low, high], or a one-line MinipError."""
    v = body.get(key, default)
    if isinstance(v, str) and v.strip():
        try:
            v = kind(v) if kind is int else float(v)
        except ValueError:
            raise MinipError(f"{key} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) \
            or not math.isfinite(v):
        raise MinipError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if not low <= v <= high:
        raise MinipError(f"{key} must be in [{low:g}, {high:g}], got {v:g}")
    return kind(v)


def _text(body: dict, key: str, default: str = "") -> str:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise MinipError(f"{key} must be text, got {type(v).__name__}")
    return str(v).strip()


def _words(v, key: str) -> list[str]:
    """A list of words, or one string of words separated by spaces."""
    if isinstance(v, str):
        return v.split()
    if isinstance(v, list) and all(isinstance(w, str) for w in v):
        return [w for w in v if w.strip()]
    raise MinipError(f"{key} must be words separated by spaces")


def _reweight(v) -> dict[str, float]:
    """{"word": factor} or "word=2 other=-0.5" -> {word: factor} (finite factors)."""
    items = [f"{k}={f}" for k, f in v.items()] if isinstance(v, dict) else _words(v, "reweight")
    out = {}
    for item in items:
        word, _, factor = item.rpartition("=")
        try:
            out[word] = float(factor)
            if not word or not math.isfinite(out[word]):
                raise ValueError
        except (TypeError, ValueError):
            raise MinipError(f"reweight {item!r}: expected WORD=FACTOR, e.g. blue=2") from None
    return out


def check_request(model, body: dict):
    """A request body (parsed JSON) -> (Request, controller, store); every problem is one
    MinipError line. The controller is built here, so that a word missing from its prompt is
    refused before the job is queued."""
    from ..pipeline import check_size
    if not isinstance(body, dict):
        raise MinipError("the request must be a JSON object")
    prompt = _text(body, "prompt")
    if not prompt:
        raise MinipError("the prompt is empty; type what to draw")
    edits = body.get("edits", [])
    if isinstance(edits, str):
        edits = [edits]
    if not isinstance(edits, list) or not all(isinstance(e, str) for e in edits):
        raise MinipError("edits must be a list of prompts")
    edits = [e.strip() for e in edits if e.strip()]
    if len(edits) > MAX_EDITS:
        raise MinipError(f"at most {MAX_EDITS} edited prompts, got {len(edits)}")
    prompts = [prompt] + edits
    for p in prompts:
        if len(p) > MAX_PROMPT:
            raise MinipError(f"a prompt is {len(p)} characters long; at most {MAX_PROMPT}")
    f = model.vae.cfg.downscale
    native = model.unet.cfg.sample_size * f
    r = Request(prompts=prompts,
                seed=_number(body, "seed", 0, int, 0, 2 ** 32 - 1),
                steps=_number(body, "steps", 10, int, 1, MAX_STEPS),
                guidance=_number(body, "guidance", 7.5, float, 0, 50),
                height=_number(body, "height", native, int, f, MAX_SIDE),
                width=_number(body, "width", native, int, f, MAX_SIDE),
                method=_text(body, "method", "p2p") or "p2p",
                mode=_text(body, "mode", "auto") or "auto",
                cross=_text(body, "cross", "0.8") or "0.8",
                self_=_text(body, "self", "0.4") or "0.4",
                blend=_words(body.get("blend") or [], "blend"))
    check_size(model, r.height, r.width)
    r.reweight = _reweight(body.get("reweight") or {})
    if r.method not in ("p2p", "masactrl"):
        raise MinipError(f"unknown method {r.method!r}; use p2p or masactrl")
    if r.method == "masactrl":
        r.masa_step = _number(body, "masa_step", min(4, r.steps - 1), int, 0, r.steps - 1)
        layers = len(model.unet.transformer_blocks())
        r.masa_layer = _number(body, "masa_layer", masactrl.default_layer(model.unet), int, 0, layers - 1)
    step_pixels = views.coarse_pixels(model, r.height, r.width)
    return (r, *_controller(model, r, step_pixels))


def _controller(model, r: Request, step_pixels: int):
    """(controller, store) for the request: the store keeps each step's coarse cross maps."""
    from ..control import AttentionStore, Compose
    from ..methods import p2p
    from ..methods.align import parse_window
    if len(r.prompts) == 1 or r.method == "masactrl":
        if r.reweight or r.blend:
            raise MinipError("reweight and blend words are Prompt-to-Prompt edits: give an edited "
                             "prompt and method p2p")
        store = AttentionStore(len(r.prompts), step_pixels=step_pixels)
        if len(r.prompts) == 1:
            return store, store
        ctrl = masactrl.build(model.tokenizer, r.prompts, r.steps, r.masa_step, r.masa_layer,
                              len(model.unet.transformer_blocks()))
        return Compose(ctrl, store), store
    cross, self_ = parse_window(r.cross), parse_window(r.self_)
    if isinstance(self_, dict):
        raise MinipError("the self-attention window takes a number (0.4) or a pair (0.1,0.4)")
    return p2p.build(model.tokenizer, r.prompts, r.steps, r.mode, cross, self_, r.reweight,
                     r.blend or None, store=True, step_pixels=step_pixels)
