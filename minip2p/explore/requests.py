"""The explorer's requests: the limits, and every field of a POST /api/run body checked into a
`Request` before a job is queued (a bad field is one line, HTTP 400).

    {"method": "masactrl", "prompt": "a cat", "edits": ["a dog"], "seed": 0, "steps": 10,
     "params": {"start_step": 2}, "image": "data:image/png;base64,…"}

`params` are the method's own parameters named as in Python (`methods.parameters(name)`); their
JSON values are turned into the Python types the methods take (a window pair becomes a tuple,
words may be one string split at spaces) and then `methods.prepare` checks everything, so the
page and the command line refuse the same things. A request without a method is Prompt-to-Prompt;
Prompt-to-Prompt with no edited prompt and no picture just looks (the prompt's image and maps);
earlier field names (mode, cross, self, reweight "blue=2", blend, masa_step, masa_layer) work.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .. import methods
from ..errors import MinipError, ParameterError
from .picture import MAX_PICTURE_SIDE, decode_picture
from ..real.images import check_picture

MAX_BODY = 16 * 1024 * 1024   # bytes of a request body (a picture, base64, fits)
MAX_STEPS = 100               # denoising steps of one job
MAX_SIDE = 1024               # image height and width, pixels
MAX_EDITS = 3                 # edited prompts beside the source
MAX_PROMPT = 400              # characters of a prompt
MAX_QUEUE = 20                # jobs waiting; more are refused (503) until some finish
KEEP_JOBS = 20                # finished jobs whose files stay in the output folder
FILE_NAME = re.compile(r"[0-9]+-(image|x0|input)(-[0-9]+)+\.png")   # what /out/ may serve
LIMITS = {"max_body": MAX_BODY, "max_steps": MAX_STEPS, "max_side": MAX_SIDE,
          "max_edits": MAX_EDITS, "max_prompt": MAX_PROMPT, "max_picture_side": MAX_PICTURE_SIDE}
OLD_NAMES = {"mode": "mode", "cross": "cross_replace", "self": "self_replace",
             "reweight": "reweight", "blend": "blend", "masa_step": "start_step",
             "masa_layer": "start_layer"}                 # earlier top-level fields -> params


class BadRequest(Exception):
    """An HTTP error with a one-line reason (status 4xx/5xx)."""
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str                           # a registered method (methods.names())
    prompts: list[str]                    # source first, then the edited prompts
    settings: dict                        # the run settings: steps, seed, guidance, size, image,
    params: dict = field(default_factory=dict)        # maps, over_time; the method's parameters
    look: bool = False                    # just the prompt's image and maps (no edit)

    @property
    def steps(self) -> int:
        return self.settings["steps"]


def describe_methods() -> dict:
    """GET /api/methods: every method with its summary and parameters (its own first, then
    those of a real picture's inversion), and the limits."""
    from dataclasses import fields

    from ..methods.editing import RealImage
    real = {f.name for f in fields(RealImage)}
    out = []
    for name in methods.names():
        m = methods.get(name)
        params = sorted((p for p in methods.parameters(name) if p.type != "path"),  # no files
                        key=lambda p: p.name in real)                            # of this machine
        out.append({"name": name, "summary": m.SUMMARY, "edits_pictures": m.EDITS_PICTURES,
                    "parameters": [{"name": p.name, "default": p.default, "help": p.help,
                                    "type": p.type, "choices": p.choices, "picture": p.name in real}
                                   for p in params]})
    return {"methods": out, "limits": LIMITS}


# ------------------------------------------------------------------------ plain fields

def _number(body: dict, key: str, default, kind, low, high):
    """body[key] as an int or float within [low, high], or a one-line MinipError."""
    v = default if body.get(key) is None else body[key]
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
    v = default if body.get(key) is None else body[key]
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise MinipError(f"{key} must be text, got {type(v).__name__}")
    return str(v).strip()


def _prompts(body: dict) -> list[str]:
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
    for p in [prompt] + edits:
        if len(p) > MAX_PROMPT:
            raise MinipError(f"a prompt is {len(p)} characters long; at most {MAX_PROMPT}")
    return [prompt] + edits


# ------------------------------------------------------------------ the method's parameters

def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "…"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _window(name: str, v):
    """A number, a [start, end] pair, or {word: number or pair}: pairs become tuples."""
    if _is_number(v):
        return v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v)):
        return tuple(v)
    if isinstance(v, dict) and v and all(isinstance(k, str) for k in v):
        return {k: _window(name, x) for k, x in v.items()}
    raise ParameterError(name, f"must be a fraction s, a [start, end] pair or "
                               f"{{\"default_\": s, word: s}}, got {_short(v)}")


def _value(p, v):
    """A JSON value of parameter p (a base.Parameter) in the Python type its method takes."""
    t, bad = p.type, None
    if t == "int":
        ok = _is_number(v) and v == int(v)
        v, bad = (int(v), None) if ok else (v, "an integer")
    elif t == "float":
        bad = None if _is_number(v) else "a number"
    elif t == "bool":
        bad = None if isinstance(v, bool) else "true or false"
    elif t == "str":
        bad = None if isinstance(v, str) else "text"
    elif t == "choice":
        bad = None if v in p.choices else f"one of {', '.join(map(str, p.choices))}"
    elif t in ("words", "lines"):
        if isinstance(v, str):
            v = v.split() if t == "words" else [s.strip() for s in v.splitlines() if s.strip()]
        ok = isinstance(v, list) and all(isinstance(w, str) and w for w in v)
        bad = None if ok else ("words" if t == "words" else "a list of sentences")
    elif t == "window":
        return _window(p.name, v)
    elif t in ("reweight", "resizes"):
        ok = isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items())
        bad = None if ok else "{word: number}"
    elif t == "moves":
        ok = isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, list) and len(x) == 2 and all(map(_is_number, x))
            for k, x in v.items())
        v, bad = ({k: tuple(x) for k, x in v.items()}, None) if ok else (v, "{word: [x, y]}")
    if bad:
        raise ParameterError(p.name, f"must be {bad}, got {_short(v)}")
    return v


def _reweight(v) -> dict[str, float]:
    """The earlier reweight field: "word=2 other=-0.5" (or a dict) -> {word: factor}."""
    if isinstance(v, dict):
        return v
    if not isinstance(v, str):
        raise MinipError("reweight must be WORD=FACTOR pairs separated by spaces, e.g. blue=2")
    out = {}
    for item in v.split():
        word, _, factor = item.rpartition("=")
        try:
            out[word] = float(factor)
            if not word or not math.isfinite(out[word]):
                raise ValueError
        except (TypeError, ValueError):
            raise MinipError(f"reweight {item!r}: expected WORD=FACTOR, e.g. blue=2") from None
    return out


def _old_fields(body: dict, method: str) -> dict:
    """The earlier top-level P2P/MasaCtrl fields, as params (where the method has them)."""
    from ..methods.align import parse_window
    own = {p.name: p for p in methods.parameters(method)}
    out = {}
    for old, new in OLD_NAMES.items():
        v = body.get(old)
        if v is None or v == "" or new not in own:
            continue
        if old in ("cross", "self") and isinstance(v, str):
            v = parse_window(v)
        elif old == "reweight":
            v = _reweight(v)
        out[new] = _value(own[new], v)
    return out


def _params(body: dict, method: str) -> dict:
    given = body.get("params")
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise MinipError("params must be an object {parameter: value}")
    known = {p.name: p for p in methods.parameters(method) if p.type != "path"}
    out = _old_fields(body, method)
    for name, v in given.items():
        if any(p.name == name and p.type == "path" for p in methods.parameters(method)):
            raise ParameterError(name, "names a file of this machine: only the command line "
                                       "takes it")
        if name not in known:
            where = "a run setting: give it as a field of the request" \
                if name in {s.name for s in methods.settings()} else None
            if where:
                raise ParameterError(name, f"is {where}, not in params")
            methods.prepare(method, [], **{name: None})     # raises: names the methods it is of
        if v is None or v == "":
            out.pop(name, None)                              # the default
        else:
            out[name] = _value(known[name], v)
    return {k: v for k, v in out.items() if v != []}


# ------------------------------------------------------------------------ the request

def check_request(model, body: dict, controlnets=()) -> Request:
    """A request body (parsed JSON) -> Request; every problem is one MinipError line."""
    from ..pipeline import check_size
    if not isinstance(body, dict):
        raise MinipError("the request must be a JSON object")
    prompts = _prompts(body)
    name = _text(body, "method", "p2p") or "p2p"
    method = methods.get(name)
    f = model.vae.cfg.downscale
    native = model.unet.cfg.sample_size * f
    settings = dict(seed=_number(body, "seed", 0, int, 0, 2 ** 32 - 1),
                    steps=_number(body, "steps", 10, int, 1, MAX_STEPS),
                    guidance=_number(body, "guidance", 7.5, float, 0, 50),
                    height=_number(body, "height", native, int, f, MAX_SIDE),
                    width=_number(body, "width", native, int, f, MAX_SIDE),
                    image=decode_picture(body.get("image")))
    check_size(model, settings["height"], settings["width"])
    settings.update(hint_controls(body, controlnets, settings["height"], settings["width"]))
    if settings["image"] is not None:              # the centre crop keeps enough of the picture
        check_picture(settings["image"], settings["height"], settings["width"])
    params = _params(body, name)
    if name == "p2p" and len(prompts) == 1 and settings["image"] is None:
        if params:
            raise MinipError(f"{', '.join(params)}: Prompt-to-Prompt edits need an edited "
                             "prompt; give an edited prompt (or a picture), or leave them out")
        return Request(name, prompts, {**settings, "maps": True, "over_time": True}, look=True)
    if hasattr(method, "check_model"):                   # e.g. instruct needs its own weights
        method.check_model(model)
    settings.update(_views(name, prompts, settings, params))
    return Request(name, prompts, settings, params)


def hint_controls(body: dict, controlnets, height: int, width: int) -> dict:
    """{"controls": [every net on the `hint` picture, made by `hint_kind`: canny (its edges) or
    hint (as it is), at `control_scale`]}; {} without a hint."""
    if body.get("hint") in (None, ""):
        return {}
    if not controlnets:
        raise MinipError("hint: this explorer has no ControlNet; start it with one")
    from ..conditioning import Control, make_hint
    kind, scale = _text(body, "hint_kind", "canny"), _number(body, "control_scale", 1, float, 0, 10)
    try:
        hint = make_hint(kind, decode_picture(body["hint"]), height, width)
    except MinipError as e:
        raise MinipError(f"hint: {e}") from None
    return {"controls": [Control(net, hint, scale).check() for net in controlnets]}


def _views(name: str, prompts: list[str], settings: dict, params: dict) -> dict:
    """{"maps", "over_time"} as far as the method keeps them: every value checked by
    methods.prepare; a method that refuses maps (or per-step views) runs without them."""
    extra = {"maps": True, "over_time": settings["image"] is None}
    while True:
        try:
            methods.prepare(name, prompts, **settings, **extra, **params)
            return extra
        except ParameterError as e:
            if not extra.get(e.name):
                raise
            extra[e.name] = False
