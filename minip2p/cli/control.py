"""The ControlNet options every sampling command takes, paired in order:

    --controlnet PATH_OR_REPO --control canny:photo.png|hint:depth.png
        [--control-scale S] [--control-window START,END] [--guess-mode]

The k-th --control is the k-th net's hint; --control-scale and --control-window are given once
(every net) or once per net, in the same order; --guess-mode puts every net in guess mode.
`canny:PHOTO`: the photo resampled to the image size (Lanczos up, area down, as the official
annotator) and its Canny edges (thresholds 100/200, real/canny.py) as the hint; `hint:IMAGE`: a
ready hint (depth map, pose drawing, scribble) resized to the image size. Everything is checked
when the command line is read (the hint files too); the nets load with the model (`attach`).
"""
from __future__ import annotations

import argparse

import numpy as np

from ..errors import MinipError, ParameterError

KINDS = ("canny", "hint")


def control_arg(text: str):
    """'canny:photo.png' / 'hint:depth.png' -> (kind, PIL image), read now (one line if not)."""
    from ..real.images import open_image
    kind, sep, path = text.partition(":")
    if not sep or kind not in KINDS:
        raise argparse.ArgumentTypeError(f"--control must be canny:PHOTO or hint:IMAGE, "
                                         f"got {text!r}")
    try:
        return kind, open_image(path)
    except MinipError as e:
        raise argparse.ArgumentTypeError(f"--control {text!r}: {e}") from None


def scale_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"--control-scale must be a finite number, got {text!r}")
    return v


def window_arg(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--control-window must be START,END (fractions of the "
                                         f"steps, e.g. 0,0.5), got {text!r}") from None
    if not (0 <= a < b <= 1):
        raise argparse.ArgumentTypeError(f"--control-window needs 0 ≤ START < END ≤ 1, "
                                         f"got {text!r}")
    return a, b


def add_control_options(p: argparse.ArgumentParser):
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH_OR_REPO",
                   help="a ControlNet (diffusers folder or Hub id, or an original-layout "
                        ".safetensors file) conditioning every step on a hint (repeatable)")
    p.add_argument("--control", action="append", default=[], type=control_arg,
                   metavar="canny:PHOTO|hint:IMAGE",
                   help="the hint of the ControlNet of the same rank: a photo's Canny edges, or "
                        "a ready hint image (depth, pose, scribble)")
    p.add_argument("--control-scale", action="append", default=[], metavar="S",
                   type=scale_arg,
                   help="weight of the ControlNets' residuals: once, or once per net (1.0)")
    p.add_argument("--control-window", action="append", default=[], type=window_arg,
                   metavar="START,END",
                   help="the fraction of the steps where the nets act: once, or once per net "
                        "(0,1)")
    p.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode: decaying scales, control on the conditional "
                        "rows only (the net recognises the content with less from the prompt)")


def check_controls(args) -> int:
    """Before any work: the counts paired. Returns the number of nets."""
    n = len(args.controlnet)
    if n == 0:
        given = [f for f, v in (("--control", args.control), ("--control-scale",
                                                              args.control_scale),
                                ("--control-window", args.control_window),
                                ("--guess-mode", args.guess_mode)) if v]
        if given:
            raise MinipError(f"{given[0]} sets a ControlNet's hint or strength; add "
                             "--controlnet PATH_OR_REPO")
        return 0
    if len(args.control) != n:
        raise MinipError(f"{len(args.control)} --control for {n} --controlnet: give one hint per "
                         f"net, in the same order" + (" (more hints than nets)"
                                                      if len(args.control) > n else ""))
    for flag, values in (("--control-scale", args.control_scale),
                         ("--control-window", args.control_window)):
        if len(values) not in (0, 1, n):
            raise MinipError(f"{len(values)} {flag} for {n} --controlnet: give it once (every "
                             "net) or once per net")
    return n


def attach(args, model, height: int | None = None, width: int | None = None):
    """The model with the command line's ControlNets (the model itself when there are none).
    Hints are made at height × width (default: the model's native size)."""
    from ..conditioning import Control, conditioned, make_hint
    from ..load.controlnet import load_controlnet
    from ..pipeline import check_size
    n = check_controls(args)
    if n == 0:
        return model
    height, width = check_size(model, height or args.height, width or args.width)
    each = lambda values, default: [values[k if len(values) > 1 else 0] if values else default
                                    for k in range(n)]
    controls = []
    for spec, (kind, image), scale, window in zip(args.controlnet, args.control,
                                                  each(args.control_scale, 1.0),
                                                  each(args.control_window, (0.0, 1.0))):
        net = load_controlnet(spec, dtype=model.dtype, device=args.device, base=model,
                              fast=not getattr(args, "explicit", False))
        controls.append(Control(net, make_hint(kind, image, height, width), scale,
                                args.guess_mode, window))
    try:
        return conditioned(model, controls)
    except ParameterError as e:
        raise MinipError(f"--control: {e.problem}") from None
