"""The editing methods, one file each, and their registry (registry.py), which Python, the
command line and the explorer share:

    from minip2p import load_model, methods
    result = methods.run(load_model(), "masactrl", ["a red circle", "a big red circle"], steps=20)
    result.images, result.store          # PIL images (source first); the maps where kept
    methods.names(), methods.parameters("masactrl")

Each method module declares its parameters once (`Params`, a dataclass with the official
defaults and a `check` that names the parameter at fault) and a `run` (base.py). Controllers on
the control surface: p2p.py (with align.py, blend.py), masactrl.py, pnp.py; ways to start or
steer the loop: sdedit.py, attend_excite.py, pix2pix_zero.py, self_guidance.py (gradient.py),
instruct.py; editing.py runs an edit from noise, SDEdit or an inversion; noise_reg.py is
Pix2Pix-Zero's regularised inversion.
"""
from importlib import import_module

_API = ("names", "get", "parameters", "settings", "prepare", "run", "Result", "METHODS")


def __getattr__(name):
    # the registry imports every method; loaded on first use so that a method module (or
    # real/invert.py, which uses noise_reg) can be imported on its own without a cycle
    if name in _API:
        return getattr(import_module(".registry", __name__), name)
    raise AttributeError(f"module 'minip2p.methods' has no attribute {name!r}")
