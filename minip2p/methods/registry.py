"""The one registry of methods that Python, the command line and the explorer share.

    methods.names()                       every registered method
    methods.parameters("masactrl")        its parameters: name, default, one-line help
    methods.run(model, "masactrl", ["a red circle", "a big red circle"], steps=20, seed=0)

`run` takes the run settings every method shares (base.Settings: steps, seed, guidance,
height, width, sampler, image, maps, controls (ControlNets, see conditioning/), …) and the
method's own parameters, all as keywords. An unknown method or parameter, a parameter of another
method, or a value out of range is one MinipError line that names it, before any work.
"""
from __future__ import annotations

from dataclasses import fields

from ..conditioning import conditioned
from ..errors import MinipError
from . import (asyrp, attend_excite, diffuseit, instruct, masactrl, p2p, pix2pix_zero, pnp,
               sdedit, self_guidance)
from .base import Parameter, ParameterError, Result, Settings, describe

METHODS = {m.NAME: m for m in (p2p, masactrl, pnp, sdedit, attend_excite, pix2pix_zero,
                               self_guidance, instruct, asyrp, diffuseit)}
SETTINGS = tuple(f.name for f in fields(Settings))

__all__ = ["METHODS", "names", "get", "parameters", "settings", "prepare", "run", "Result"]


def names() -> list[str]:
    return list(METHODS)


def get(name: str):
    """The method's module (NAME, SUMMARY, EDITS_PICTURES, Params, run)."""
    if name not in METHODS:
        raise MinipError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def parameters(name: str) -> list[Parameter]:
    """The method's own parameters, with their defaults and help."""
    return describe(get(name).Params)


def settings() -> list[Parameter]:
    """The run settings every method takes."""
    return describe(Settings)


def prepare(name: str, prompts, **kw) -> tuple:
    """(module, Params, Settings, prompts) from keywords, every value checked; no model needed."""
    method = get(name)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ParameterError("prompts", "must be a prompt or a list of prompts (strings)")
    own = {f.name for f in fields(method.Params)}
    params, run_settings = {}, {}
    for key, value in kw.items():
        if key in own:
            params[key] = value
        elif key in SETTINGS:
            run_settings[key] = value
        else:
            others = [n for n, m in METHODS.items() if key in {f.name for f in fields(m.Params)}]
            where = f"belongs to another method ({', '.join(others)}), not {name}" if others \
                else f"is not a parameter of {name}"
            raise ParameterError(key, f"{where}; leave it out")
    s = Settings(**{**getattr(method, "DEFAULTS", {}), **run_settings})
    s.check()
    if method.EDITS_PICTURES == "no" and s.image is not None:
        raise ParameterError("image", f"{name} makes images from prompts; it edits no picture")
    if method.EDITS_PICTURES == "required" and s.image is None:
        raise ParameterError("image", f"is needed: {name} edits a picture")
    p = method.Params(**params)
    p.check(list(prompts), s)
    return method, p, s, list(prompts)


def run(model, name: str, prompts, **kw) -> Result:
    """Run method `name` on `model` (see the module docstring); returns a base.Result."""
    method, p, s, prompts = prepare(name, prompts, **kw)
    return method.run(conditioned(model, s.controls), prompts, p, s)
