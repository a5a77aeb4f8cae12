"""What every method shares: how it declares its parameters, the run settings every method takes,
and what it returns.

A method module declares its parameters once, as a dataclass `Params` whose fields carry the
official defaults and a one-line help (`param(default, help)`), and a `run(model, prompts, p, s)`
that returns a `Result`. `Params.check(s)` refuses what is out of range before any work, in one
line that names the *parameter* (`ParameterError`); the command line translates the name into
the flag its user typed. The registry (registry.py) knows every method by name.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ParameterError

INVERSIONS = ("ddim", "null-text", "negative-prompt", "direct", "edict", "renoise")


def param(default: Any, help: str, choices: tuple | None = None, kind: type | None = None):
    """A dataclass field with its one-line help (and its choices or element type, for forms)."""
    meta = {"help": help, "choices": choices, "kind": kind}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Parameter:
    """One parameter of a method, as `methods.parameters(name)` lists it."""
    name: str
    default: Any
    help: str
    type: str                   # "int", "float", "bool", "str", "words", "choice", "pairs" …
    choices: tuple | None = None


def describe(params_cls) -> list[Parameter]:
    out = []
    for f in fields(params_cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = f.metadata.get("kind")
        type_name = kind.__name__ if isinstance(kind, type) else (kind or _type_of(f.type))
        out.append(Parameter(f.name, default, f.metadata.get("help", ""),
                             "choice" if f.metadata.get("choices") else type_name,
                             f.metadata.get("choices")))
    return out


def _type_of(annotation) -> str:
    text = str(annotation)
    for name in ("bool", "int", "float", "str"):
        if text.startswith(name):
            return name
    return text


@dataclass
class Settings:
    """The run settings every method takes (keywords of `methods.run`).

    image:     a real picture to edit (PIL image or path), for the methods that edit pictures;
               or an `real.invert.Inversion` (its prompt is then the source)
    maps:      keep the attention maps (an AttentionStore in `Result.store`)
    map_res:   rows of the maps to show (default: the coarsest stored down/up resolution)
    over_time: also keep each step's cross maps (at map_res) and the predicted x̂₀ (Result.x0)
    controls:  ControlNets taking part in every UNet call: conditioning.Control objects (or
               their keywords: net, hint, scale, guess, window), see conditioning.py
    """
    steps: int = 50
    seed: int = 0
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    sampler: str = "ddim"
    image: Any = None
    maps: bool = False
    map_res: int | None = None
    over_time: bool = False
    progress: bool = False
    free_text_encoder: bool = False
    controls: list = field(default_factory=list)

    def check(self) -> None:
        for name in ("steps", "height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ParameterError(name, f"must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed < 2 ** 64:
            raise ParameterError("seed", f"must be an integer in [0, 2⁶⁴), got {self.seed!r}")
        check_number("guidance", self.guidance)
        if not isinstance(self.controls, (list, tuple)):
            raise ParameterError("controls", "must be a list of ControlNets (conditioning.Control)")
        if self.over_time:
            self.ddim_only("over_time (x̂₀ of each DDIM step)")

    def ddim_only(self, what: str) -> None:
        """Inversion and starting part-way (real images, SDEdit) are DDIM's."""
        if self.sampler != "ddim":
            raise ParameterError("sampler", f"{self.sampler}: {what} needs the ddim sampler")


@dataclass
class Result:
    """What a method returns.

    images:  PIL images, the source (or unedited image) first
    labels:  a caption per image (the prompts)
    inputs:  the real picture(s) as the method saw them (fitted), for showing beside the result
    store:   the AttentionStore where the method keeps maps (else None)
    x0:      per step, the predicted x̂₀ latents (with `over_time`), else None
    extra:   anything method-specific (e.g. the inversion made on the way)
    """
    images: list
    labels: list[str]
    inputs: list = field(default_factory=list)
    store: Any = None
    x0: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def maps(self):
        return self.store


def check_number(name: str, v, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite number, in [low, high] (open ends where asked), else a ParameterError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
        raise ParameterError(name, f"must be a finite number, got {v!r}")
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{'-∞' if low is None else f'{low:g}'}, {'∞' if high is None else f'{high:g}'}{hi}"
    if low is not None and (v < low or (low_open and v == low)) or \
            high is not None and (v > high or (high_open and v == high)):
        raise ParameterError(name, f"must be in {span}, got {v:g}")
    return float(v)


def words_of(prompt: str) -> list[str]:
    """The words of a prompt as the methods name them: split at spaces."""
    return prompt.split(" ")


def check_word(name: str, word: str, prompt: str, what: str = "the prompt") -> None:
    if word not in words_of(prompt):
        raise ParameterError(name, f"{word!r}: the word is not in {what} {prompt!r}; "
                                   f"give a word of it")


def read_image(image):
    """A PIL image or a path -> an RGB PIL image (one line if it cannot be read)."""
    from ..real import images
    if isinstance(image, (str, Path)):
        return images.open_image(str(image))
    if hasattr(image, "convert"):
        return image.convert("RGB")
    raise ParameterError("image", f"must be a PIL image or a path, got {type(image).__name__}")
