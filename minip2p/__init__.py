"""minip2p: a minimal, readable Stable Diffusion with attention control built into its forward pass.

    from minip2p import load_model, methods
    model = load_model()                  # the shipped toy model; or a folder, a Hub id, a file
    result = methods.run(model, "p2p", ["a red circle", "a blue circle"], steps=20)

The lesson is at the door: attention.py (softmax(QKᵀ/√d)·V, and where a controller sees M),
control.py (the hooks), guidance.py (classifier-free guidance), pipeline.py (the sampling loop).
Then model/ (the networks), load/ (checkpoints), samplers/, methods/ (every editing method and
their registry), conditioning/ (ControlNets: residuals on the UNet's skips, beside the
controllers), real/ (real pictures and inversions), fast/ (kernels picked by measurement),
explore/ (the web page), data/ (InstructPix2Pix's training pairs) and cli/.
"""
from .errors import MinipError

__all__ = ["MinipError", "load_model", "methods"]


def __getattr__(name):
    # imported on first use, so that `minip2p --help` and the error type need no torch
    from importlib import import_module
    if name == "load_model":
        return import_module(".load", __name__).load_model
    if name == "methods":
        return import_module(".methods", __name__)
    raise AttributeError(f"module 'minip2p' has no attribute {name!r}")
